"""``tikmix influence``: one-shot Group Influence for a saved model and the TiKMiX-D mixture it recommends."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UsageError, check_folder
from .models import load_model, load_tokenizer
from .sources import load_texts, pack_all, parse_sources, parse_weights


def cmd_influence(args: argparse.Namespace) -> int:
    import numpy as np

    from ..report import markdown_table

    if not args.domains:
        raise UsageError("--domains: give the domains to measure (NAME=PATH ..., or a YAML/JSON mapping file)")
    if not args.validation:
        raise UsageError("--validation: give the validation sets (NAME=PATH ..., or a YAML/JSON mapping file)")
    for flag, value in (("--probe-sequences", args.probe_sequences), ("--validation-sequences",
                        args.validation_sequences), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} {value}: give a positive integer")
    check_folder(args.model, "--model", "a folder written by model.save_pretrained")
    if args.tokenizer:
        check_folder(args.tokenizer, "--tokenizer", "a tokenizer folder")
    domains = parse_sources(args.domains, "--domains")
    validation = parse_sources(args.validation, "--validation")
    prior_spec = parse_weights(args.prior, "--prior")
    output = Path(args.output)
    if output.is_dir():
        raise UsageError(f"--output {output}: a folder; give a file name such as {output / 'influence.json'}")

    import torch
    from transformers import default_data_collator

    from .._io import save_json_atomic
    from ..influence import group_influence
    from ..mixture import DomainMixture
    from ..solvers import solve_direct

    model = load_model(args.model, "--model")
    tokenizer = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
    if tokenizer.eos_token_id is None:
        raise UsageError(f"the tokenizer of {args.tokenizer or args.model} has no eos token, which packing needs")
    max_positions = getattr(model.config, "max_position_embeddings", None) or args.block_size or 128
    block = args.block_size or min(128, max_positions)
    if block > max_positions:
        raise UsageError(f"--block-size {block}: longer than the model's max_position_embeddings={max_positions}")
    blocks = pack_all({n: load_texts(s, args.text_column) for n, s in domains.items()}, tokenizer, block, domains)
    val_blocks = pack_all({n: load_texts(s, args.text_column) for n, s in validation.items()}, tokenizer, block,
                           validation)
    try:
        mixture = DomainMixture(blocks, weights=prior_spec, seed=args.seed)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--prior {args.prior}: {err}") from None

    def batches(examples):
        size = args.batch_size
        return [default_data_collator(examples[i : i + size]) for i in range(0, len(examples), size)]

    rng = np.random.default_rng(args.seed)
    domain_batches = {d: batches(mixture.probe(d, args.probe_sequences)) for d in blocks}
    validation_batches = {}
    for name, data in val_blocks.items():
        idx = rng.permutation(len(data))[: args.validation_sequences]
        validation_batches[name] = batches([data[int(i)] for i in idx])
    model.train()
    with torch.random.fork_rng(devices=[]):
        result = group_influence(model, domain_batches, validation_batches, preconditioner=args.preconditioner,
                                 seed=args.seed, show_progress=not args.no_progress)
    prior = np.array([mixture.weights[d] for d in mixture.domains])
    solved = solve_direct(result.scores, prior, alpha=args.alpha, beta=args.beta, gamma=args.gamma,
                          pareto=not args.no_pareto, domains=list(result.domain_names), tasks=list(result.task_names))
    recommended = solved.as_mapping()
    S = result.scores
    rows = [[d] + [f"{S[i, j]:.4g}" for i in range(len(result.task_names))]
            + [f"{prior[j]:.3f}", f"{recommended[d]:.3f}"] for j, d in enumerate(result.domain_names)]
    print(markdown_table(["domain"] + [f"S[{t}]" for t in result.task_names] + ["prior", "TiKMiX-D"], rows))
    print(f"solver: {solved.status}: {solved.message}")
    doc = {
        "format": "tikmix_hf.influence/1",
        "model": str(Path(args.model).resolve()),
        "block_size": block,
        "probe_sequences": args.probe_sequences,
        "validation_sequences": args.validation_sequences,
        "influence": result.to_dict(),
        "prior": dict(zip(mixture.domains, map(float, prior))),
        "recommended_weights": recommended,
        "solver_result": solved.to_dict(),
    }
    save_json_atomic(output, doc)
    print(f"wrote {output}")
    return 0
