"""`fine-tune-llm release adapter|merge|gguf|push|check`: the release pipeline's subcommands."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    if out:
        p.add_argument("--out", help="output folder (default: RUN/release/<stage>)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _card(p: argparse.ArgumentParser) -> None:
    p.add_argument("--license", help="Hub licence id for the card (default: the base model's, when known)")
    p.add_argument("--dataset-id", help="Hub id of the training data, for the card's metadata")
    p.add_argument("--tokenizer-model", help="the base model's SentencePiece tokenizer.model (file or folder)")
    p.add_argument("--base-model-id", help="the base model's Hub id, when training loaded it from a local folder")


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="stage", required=True)
    a = sub.add_parser("adapter", help="adapter folder with tokenizer, generation config and model card")
    a.add_argument("run", help="run directory (or its adapter/ folder)")
    _common(a)
    _card(a)
    m = sub.add_parser("merge", help="merge the adapter into bf16 weights, with a parity check")
    m.add_argument("run", help="run directory (or its adapter/ folder)")
    m.add_argument("--mode", default="bf16", choices=["bf16", "nf4", "4bit"],
                   help="bf16: the base's released weights; nf4: the dequantized NF4 weights training saw; "
                        "4bit: measure why merging into 4-bit weights is refused")
    m.add_argument("--prompts", type=int, default=4, help="held-out test prompts for the logit comparison")
    m.add_argument("--eval-rows", type=int, default=32, help="validation rows for the eval-loss comparison")
    m.add_argument("--logit-atol", type=float, default=None, help="max |logit difference| allowed")
    m.add_argument("--loss-atol", type=float, default=None, help="max |eval loss difference| allowed")
    m.add_argument("--effect-rtol", type=float, default=None,
                   help="max mean |logit difference| as a fraction of the adapter's own effect")
    _common(m)
    _card(m)
    g = sub.add_parser("gguf", help="GGUF f16 + quantized files, Ollama Modelfile, verified in llama-cpp-python")
    g.add_argument("merged", help="merged model folder (or a run directory with release/merged)")
    g.add_argument("--quant", action="append", help="quantization (repeatable; default q8_0 and q4_k_m)")
    g.add_argument("--llama-cpp-dir", help="a llama.cpp checkout (default: the llama-cpp-python sdist's copy)")
    g.add_argument("--cache-dir", help="where the downloaded converter is kept")
    g.add_argument("--name", default="model", help="file name stem: NAME-f16.gguf, NAME-q8_0.gguf, ...")
    g.add_argument("--max-new-tokens", type=int, default=512, help="limit for the stop-by-itself check")
    _common(g)
    u = sub.add_parser("push", help="upload a checked release folder to a Hub model repo")
    u.add_argument("folder")
    u.add_argument("repo_id", help="e.g. your-name/gemma-2b-it-psych-lora")
    u.add_argument("--dry-run", action="store_true", help="list the files and sizes that would go up")
    u.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    u.add_argument("--message", help="commit message")
    c = sub.add_parser("check", help="run a release folder's own check")
    c.add_argument("folder")


def run(args: argparse.Namespace) -> int:
    """Release a run: adapter, merged model, GGUF, Hub push - each folder checked."""
    return {"adapter": _adapter, "merge": _merge, "gguf": _gguf, "push": _push, "check": _check}[args.stage](args)


def _card_kwargs(args: argparse.Namespace) -> dict:
    return {"license": args.license, "dataset_id": args.dataset_id, "tokenizer_model": args.tokenizer_model,
            "base_model_id": args.base_model_id}


def _adapter(args: argparse.Namespace) -> int:
    from ..release import release_adapter

    out = release_adapter(args.run, args.out, overwrite=args.overwrite, **_card_kwargs(args))
    print(f"adapter release: {out}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from ..release.merge import merge_adapter

    tol = {k: v for k, v in (("logit_atol", args.logit_atol), ("loss_atol", args.loss_atol),
                             ("effect_rtol", args.effect_rtol)) if v is not None}
    result = merge_adapter(args.run, args.out, mode=args.mode, n_prompts=args.prompts, n_eval=args.eval_rows,
                           overwrite=args.overwrite, **tol, **_card_kwargs(args))
    print(result.summary())
    return 0


def _gguf(args: argparse.Namespace) -> int:
    from ..release.gguf_export import QUANTS, export_gguf

    result = export_gguf(args.merged, args.out, quants=tuple(args.quant or QUANTS), llama_cpp_dir=args.llama_cpp_dir,
                         cache_dir=args.cache_dir, name=args.name, max_new_tokens=args.max_new_tokens,
                         overwrite=args.overwrite)
    print(result.summary())
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..release.push import push_folder

    result = push_folder(args.folder, args.repo_id, dry_run=args.dry_run, private=not args.public,
                         commit_message=args.message)
    verb = "would upload" if result.dry_run else "uploaded"
    print(f"{verb} to {result.repo_id} ({'private' if result.private else 'public'}):")
    print(result.listing())
    if result.commit_url:
        print(f"commit: {result.commit_url}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ..release import check_folder

    result = check_folder(args.folder)
    for w in result.warnings:
        print(f"  warning: {w}")
    for e in result.errors:
        print(f"  error: {e}")
    print(f"{result.kind} {result.folder}: {'ok' if result.ok else 'FAILED'}")
    return 0 if result.ok else 1
