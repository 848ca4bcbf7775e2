"""Local ``evaluate`` metric modules shipped with tikmix_hf, one folder per metric.

Load them with :func:`tikmix_hf.demo.corpora.load_metric`, which passes the folder's path to
``evaluate.load`` (never a hub name, so it works offline). The folders hold ``__init__.py``
files only so that setuptools' package discovery ships them without warnings.
"""
