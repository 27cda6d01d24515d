"""``fastnest train``, ``fastnest analyze``, ``fastnest route``, ``fastnest plot`` and ``fastnest convert``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..constants import DEFAULT_SCALES


def _scales(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parts(text: str) -> tuple[str, ...]:
    return () if text == "none" else tuple(p for p in text.split(",") if p)


def train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from .config import DEFAULT_STEPS, TrainConfig

    d = TrainConfig()
    p = parser or argparse.ArgumentParser(prog="fastnest train")
    p.description = (
        "Train a LLaVA model on every Matryoshka scale at once (--connector mqt: an MQT-LLaVA on its token counts). "
        "Without --model/--data: a tiny model from scratch on the built-in synthetic visual-question set (about 5 "
        "minutes on 2 CPU cores), then the granularity analysis."
    )
    _model_and_data_options(p.add_argument_group("model and data"), d)
    _optimisation_options(p.add_argument_group("optimisation"), d, DEFAULT_STEPS)
    _run_options(p.add_argument_group("checkpoints and processes"), d)
    return p


def _model_and_data_options(g, d) -> None:
    from .config import ARCHS, CONNECTORS, DEFAULT_NUM_QUERIES, QUERY_KEYS, SCALE_SAMPLING

    g.add_argument("--output-dir", default=d.output_dir, help="run directory (default: %(default)s)")
    g.add_argument(
        "--model",
        help="Hugging Face LLaVA or LLaVA-NeXT (or, with --connector mqt, mqt_llava) directory (default: the built-in "
        "tiny model, from scratch)",
    )
    g.add_argument("--data", help="LLaVA conversation-format .json (array) or .jsonl (default: built-in synthetic)")
    g.add_argument("--image-folder", help="root of the image paths in --data (default: the file's folder)")
    g.add_argument("--eval-data", help="data for the analysis at the end (default: the synthetic evaluation split)")
    g.add_argument("--eval-image-folder")
    g.add_argument(
        "--connector",
        choices=CONNECTORS,
        default=d.connector,
        help="pooled: LLaVA-1.5's projector pooled to --scales (M3); mqt: a Matryoshka Query Transformer trained "
        "on --num-tokens (MQT-LLaVA) (default: %(default)s)",
    )
    g.add_argument(
        "--arch",
        choices=ARCHS,
        help="--connector pooled: the built-in tiny model's family, llava (LLaVA-1.5) or llava-next (anyres crops, "
        "image_newline); with --model it must be the model's own (default: llava, or --model's)",
    )
    g.add_argument(
        "--scales",
        type=_scales,
        help=f"visual-token scales, --connector pooled (default: {','.join(map(str, DEFAULT_SCALES))})",
    )
    g.add_argument(
        "--scale-sampling",
        choices=SCALE_SAMPLING,
        default=d.scale_sampling,
        help="--connector pooled: every scale each step (all, M3's objective) or one random scale per step (random: "
        "the paper's ablation, a cheaper step) (default: %(default)s)",
    )
    g.add_argument(
        "--num-tokens",
        help="--connector mqt: token counts per step: released (one of 2,4,...,M per step, as the release), random:K "
        "(K of them per step) or a list such as 2,8,32,64 (every one each step) (default: 2,4,8,16,36,64,144 below "
        "M, then M)",
    )
    g.add_argument(
        "--num-queries",
        type=_positive,
        help=f"--connector mqt, built-in model: its queries M, a square whose side divides 48 "
        f"(default: {DEFAULT_NUM_QUERIES})",
    )
    g.add_argument(
        "--query-keys",
        choices=QUERY_KEYS,
        help="--connector mqt, built-in model: positional (the release's keys) or features (the paper's "
        "cross-attention) (default: positional)",
    )
    g.add_argument("--max-length", type=int, default=d.max_length, help="longest row in tokens, images included")
    g.add_argument("--on-bad-sample", choices=("skip", "fail"), default=d.on_bad_sample)
    g.add_argument("--system", default=d.system, help="system prompt of the LLaVA v1 template")
    g.add_argument(
        "--synthetic-turns",
        type=int,
        default=d.synthetic_turns,
        help="questions per synthetic training image, one per type (1-4)",
    )
    g.add_argument("--eval-samples", type=int, default=d.eval_samples, help="synthetic evaluation samples")


def _optimisation_options(o, d, default_steps: int) -> None:
    o.add_argument("--steps", type=int, help=f"optimizer steps (default: 1 epoch of --data; built-in: {default_steps})")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="per process and micro-batch")
    o.add_argument("--grad-accum", type=int, default=d.grad_accum)
    o.add_argument("--lr", type=float, default=d.lr)
    o.add_argument("--lr-vision", type=float, help="learning rate of the vision tower (default: --lr)")
    o.add_argument("--lr-projector", type=float, help="learning rate of the projector (default: --lr)")
    o.add_argument("--lr-lm", type=float, help="learning rate of the language model (default: --lr)")
    o.add_argument(
        "--freeze",
        type=_parts,
        help="comma-separated parts to freeze: vision,projector,lm, or none (default: vision for the built-in tiny "
        "model, whose tower stays a fixed random-feature encoder; none with --model)",
    )
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    o.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm (0: off)")
    o.add_argument(
        "--max-nonfinite-skips",
        type=int,
        default=d.max_nonfinite_skips,
        help="a step whose loss or gradient norm is not finite stops the run; with N > 0, up to N such steps in a "
        "row are skipped (no update) first (default: %(default)s)",
    )
    o.add_argument("--bf16", action="store_true", help="bfloat16 autocast (FSDP2: bf16 parameters, fp32 reduction)")
    o.add_argument("--fp16", action="store_true", help="float16 autocast with a grad scaler (not with FSDP2)")
    o.add_argument(
        "--dtype",
        default=d.dtype,
        help="dtype the weights load and train in: float32 (default) or bfloat16 (float16 is refused: use --fp16)",
    )
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--seed", type=int, default=d.seed)


def _run_options(r, d) -> None:
    r.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: at the end)")
    r.add_argument("--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept (0: all)")
    r.add_argument("--resume", help="checkpoint or run directory to resume exactly (newest checkpoint)")
    r.add_argument(
        "--resume-override",
        type=_parts,
        default=(),
        help="comma-separated options allowed to differ from the checkpoint's on --resume (steps, lr, lr-vision, "
        "lr-projector, lr-lm, weight-decay, warmup-steps, max-grad-norm, max-length, model, image-folder, bf16, fp16, "
        "dtype); recorded in the run",
    )
    r.add_argument(
        "--strategy",
        choices=("auto", "ddp", "fsdp"),
        default=d.strategy,
        help="under torchrun (auto: FSDP2 on GPUs, DDP on CPU)",
    )
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    r.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    r.add_argument("--no-analyze", dest="analyze", action="store_false", help="skip the analysis at the end")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress bar")


def _model_dir(text: str):
    """``--model``: a model directory, or a run directory holding one in model/ (its own config.json is the run's)."""
    from pathlib import Path

    model_dir = Path(text)
    return model_dir / "model" if (model_dir / "model" / "config.json").is_file() else model_dir


def analyze_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastnest analyze")
    p.description = (
        "Accuracy of a model at every visual-token scale (an MQT-LLaVA: token count), per question type, with the "
        "per-sample oracle; one packed multi-scale prefill per batch. Writes report.json, report.md and report.png."
    )
    p.add_argument("--model", required=True, help="a run's model directory (or a run directory holding model/)")
    p.add_argument(
        "--data",
        help="LLaVA conversation-format .json/.jsonl with optional question_type per row "
        "(default: the built-in synthetic evaluation split)",
    )
    p.add_argument("--image-folder")
    p.add_argument("--output-dir", help="where to write the report (default: beside the model)")
    p.add_argument("--samples", type=_positive, default=400, help="synthetic evaluation samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (selects its synthetic evaluation split)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--max-length", type=_positive, help="longest row (default: the run's)")
    p.add_argument("--on-bad-sample", choices=("skip", "fail"), default="fail")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--scales",
        type=_scales,
        help="scales to evaluate (default: the run's, else 1,9,36,144,576); of an MQT-LLaVA, token counts in 1..M "
        "(default: 2,4,8,16,36,64,144 below M, then M)",
    )
    p.add_argument(
        "--oracle-unanswered",
        choices=("smallest", "largest"),
        default="smallest",
        help="the scale at which the oracle counts a sample no scale answers: the smallest (the M3 authors' "
        "definition, the default) or the largest",
    )
    return p


def run_train(args: argparse.Namespace) -> int:
    from .trainer import TrainConfig, train

    train(TrainConfig(**vars(args)))
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from . import report
    from .analyze import analyze_model
    from .data_llava import BadSamples, LlavaJsonExamples, SyntheticExamples
    from .data_synthetic import DESIGNED_SCALES, QUESTION_TYPES
    from .run_analysis import SYNTHETIC_EVAL_SEED
    from .storage import check_output_dir

    model_dir = _model_dir(args.model)
    out = Path(args.output_dir) if args.output_dir else model_dir.parent
    check_output_dir(out)  # before the evaluation time is spent
    bad = BadSamples(args.on_bad_sample)
    if args.data:
        examples = LlavaJsonExamples(args.data, args.image_folder, bad)
        if len(examples) == 0:
            raise ValueError(f"--data {args.data}: no usable rows ({bad.summary()})")
    else:
        examples = SyntheticExamples(args.samples, seed=SYNTHETIC_EVAL_SEED + args.seed, turns=1)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    summary = analyze_model(
        model_dir,
        examples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        bad=bad,
        type_order=QUESTION_TYPES,
        device=device,
        scales=args.scales,
        unanswered=args.oracle_unanswered,
        designed=None if args.data else DESIGNED_SCALES,
    )
    if summary["num_samples"] == 0:
        raise ValueError(f"--data {args.data}: no row could be scored ({bad.summary()})")
    summary["bad_samples"] = dict(bad.counts)
    title = f"Granularity analysis of {model_dir}"
    paths = report.write(summary, out, title=title)
    print(report.markdown(summary, title))
    print(bad.summary())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def route_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastnest route")
    p.description = (
        "Fit a scale router for scale='auto' (saved in the model directory's router/) on a routing-train split, "
        "then compare it on a held-out split with every fixed scale, a training-free cascade and the oracle. "
        "Writes report.json, report.md and report.png."
    )
    p.add_argument("--model", required=True, help="a run's model directory (or a run directory holding model/)")
    p.add_argument(
        "--data",
        help="LLaVA conversation-format .json/.jsonl, one question per row (default: the built-in synthetic "
        "routing-train and held-out splits)",
    )
    p.add_argument("--image-folder")
    p.add_argument("--eval-data", help="held-out rows (default: --heldout-fraction of --data's rows)")
    p.add_argument("--eval-image-folder")
    p.add_argument("--heldout-fraction", type=_fraction, default=0.3, help="with --data alone (default: %(default)s)")
    p.add_argument("--output-dir", help="where to write the report (default: the run directory's route/)")
    p.add_argument("--train-samples", type=_positive, default=2000, help="synthetic routing-train samples")
    p.add_argument("--heldout-samples", type=_positive, default=400, help="synthetic held-out samples")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (selects the synthetic splits; the split)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--max-length", type=_positive, help="longest row (default: the run's)")
    p.add_argument("--on-bad-sample", choices=("skip", "fail"), default="fail")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--scales", type=_scales, help="scales to route among (default: as fastnest analyze)")
    p.add_argument("--hidden", type=_positive, default=64, help="the router MLP's hidden width")
    p.add_argument("--fit-steps", type=_positive, default=400, help="full-batch optimizer steps of the fit")
    p.add_argument("--folds", type=_positive, default=5, help="folds of the out-of-fold budget choice")
    p.add_argument("--max-new-tokens", type=_positive, default=16, help="greedy answers (cascade, cost)")
    p.add_argument("--cost-samples", type=int, default=64, help="held-out prompts timed (0: no timing)")
    p.add_argument("--cost-batch-size", type=_positive, default=1)
    p.add_argument("--cost-repeats", type=_positive, default=3)
    return p


def run_route(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..hf.route import FitOptions
    from .data_llava import BadSamples, LlavaJsonExamples
    from .route import route_model
    from .route_data import ROUTE_HELDOUT_SEED, ROUTE_TRAIN_SEED, split, synthetic_splits
    from .storage import check_output_dir

    model_dir = _model_dir(args.model)
    out = Path(args.output_dir) if args.output_dir else model_dir.parent / "route"
    check_output_dir(out)
    if args.cost_samples < 0:
        raise ValueError(f"--cost-samples must be 0 (no timing) or more, got {args.cost_samples}")
    bad = BadSamples(args.on_bad_sample)
    if args.data:
        train = LlavaJsonExamples(args.data, args.image_folder, bad)
        if args.eval_data:
            heldout = LlavaJsonExamples(args.eval_data, args.eval_image_folder, bad, "--eval-data")
            splits = f"routing-train: {args.data}; held-out: {args.eval_data}"
        else:
            train, heldout = split(train, args.heldout_fraction, args.seed)
            splits = f"{args.data} split by a permutation seeded {args.seed}: held-out fraction {args.heldout_fraction}"
    else:
        train, heldout = synthetic_splits(args.train_samples, args.heldout_samples, args.seed)
        splits = (
            f"built-in synthetic: routing-train {args.train_samples} samples (seed {ROUTE_TRAIN_SEED + args.seed}), "
            f"held-out {args.heldout_samples} (seed {ROUTE_HELDOUT_SEED + args.seed})"
        )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cost = None
    if args.cost_samples:
        cost = {"samples": args.cost_samples, "batch_size": args.cost_batch_size, "repeats": args.cost_repeats}
    result = route_model(
        model_dir,
        train,
        heldout,
        out_dir=out,
        splits=splits,
        batch_size=args.batch_size,
        max_length=args.max_length,
        bad=bad,
        device=device,
        scales=args.scales,
        fit=FitOptions(hidden=args.hidden, steps=args.fit_steps, seed=args.seed),
        folds=args.folds,
        max_new_tokens=args.max_new_tokens,
        cost=cost,
    )
    print((out / "report.md").read_text())
    t = result["comparison"]["targets"]
    print(f"token ratio at the best fixed accuracy: {t['token_ratio']}; gap closed: {t['gap_closed']}")
    print(bad.summary())
    print(json.dumps(result["paths"]))
    return 0


def convert_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="fastnest convert")
    p.description = (
        "Convert an original-format LLaVA checkpoint (M3 LLaVA-1.5 or LLaVA-NeXT, MQT-LLaVA: LlavaLlamaForCausalLM) "
        "into a Hugging Face directory with its processor; the Matryoshka settings go into config.fastnest."
    )
    p.add_argument("src", metavar="SRC", help="the original checkpoint directory (config.json, weights, tokenizer)")
    p.add_argument("dst", metavar="DST", help="the new Hugging Face directory (must not exist, or be empty)")
    p.add_argument(
        "--vision-tower",
        metavar="DIR",
        help="a CLIP directory (e.g. openai/clip-vit-large-patch14-336 downloaded): the tower's config, "
        "preprocessing, and weights when SRC has none (default: mm_vision_tower, when it is a local directory)",
    )
    return p


def run_convert(args: argparse.Namespace) -> int:
    from ..hf.convert import convert_original

    print(convert_original(args.src, args.dst, args.vision_tower))
    return 0


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    from ..host_memory import retain_freed_memory
    from .data_llava import BadSampleError
    from .guards import NonFiniteError
    from .plot import plot_parser, run_plot
    from .signals import Interrupted
    from .storage import DiskFullError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()  # weight loading/saving bars would break fastnest's own progress line
    retain_freed_memory()  # this process's steps reuse their freed host memory instead of page-faulting it in
    parser = argparse.ArgumentParser(prog="fastnest", description="Matryoshka multimodal training and analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(
        sub.add_parser("train", help="train a LLaVA on every scale, or an MQT-LLaVA (default: the built-in CPU run)")
    )
    analyze_parser(sub.add_parser("analyze", help="accuracy per scale and question type, with the oracle"))
    route_parser(sub.add_parser("route", help="fit a scale router for scale='auto' and compare it on held-out data"))
    plot_parser(sub.add_parser("plot", help="a run's training curves and analysis figure (PNG/SVG)"))
    convert_parser(sub.add_parser("convert", help="an original-format LLaVA checkpoint to Hugging Face's format"))
    args = parser.parse_args(argv)
    command = args.__dict__.pop("command")
    try:
        commands = {"train": run_train, "analyze": run_analyze, "route": run_route, "plot": run_plot}
        return (commands | {"convert": run_convert})[command](args)
    except (BadSampleError, ValueError) as e:
        print(f"fastnest {command}: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, DiskFullError) as e:
        print(f"fastnest {command}: stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"fastnest {command}: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fastnest {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
