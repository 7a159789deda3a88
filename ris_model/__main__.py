"""Command line: ``python -m ris_model train|eval|music|floors|evalreport`` (works without ris_stability).

  train  --config F [--set k=v ...] [--steps N] [--out DIR] [--resume CKPT]
         (--steps N is shorthand for --set train.steps=N: the schedule is laid out for N steps)
  eval   --checkpoint F [--n N] [--snr 0 10 20] [--no-crb]   learned pipeline vs MUSIC on R_samp / R_true vs CRB
  music  --config F [--set k=v ...] [--n N] [--snr 0 10 20]     MUSIC on R_true / R_samp vs CRB
  evalreport --checkpoint F --out DIR [--n N] [--snr ...]     tables (Markdown, JSON) and figures of eval + music
  floors --config F [--set k=v ...] [--n N]     each loss term for a perfect prediction
  benchmark --config F --out DIR [--n 500] [--val 100] [--snr 0 10 20 30] [--only SNR ...] [--learned CKPT]
         ML, MUSIC and the learned detector per nominal SNR, bootstrap intervals (reports/evaluation)
  traindet --config F --out FILE      train the learned detector (deterministic, one thread)
  tunedet --checkpoint FILE [--config F]   re-tune the pipeline thresholds of a trained detector in place
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ris_model.checkpoint import CheckpointError, load_checkpoint, restore
from ris_model.config import ConfigError, load_config
from ris_model.data import BatchError
from ris_model.infer import evaluate
from ris_model.loss import format_floors, loss_floors
from ris_model.model import build_model, count_parameters
from ris_model.scoring import format_rows
from ris_model.simulate import make_system
from ris_model.train import NonFiniteError, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ris_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a config")
    t.add_argument("--config", required=True)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
    t.add_argument("--out", help="run folder (default runs/<config name>)")
    t.add_argument("--resume", help="checkpoint to continue from (same config)")
    e = sub.add_parser("eval", help="evaluate a checkpoint on the test split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--n", type=int, default=None, help="test samples (default data.n_test)")
    e.add_argument("--snr", type=float, nargs="+", default=None,
                   help="pin the nominal SNR of the test scenes to each value (default: as drawn)")
    e.add_argument("--no-crb", action="store_true", help="skip the Cramer-Rao bound (no error/CRB columns)")
    r = sub.add_parser("evalreport", help="tables and figures of a composite-loss checkpoint")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--n", type=int, default=128)
    r.add_argument("--snr", type=float, nargs="+", default=[0.0, 10.0, 20.0])
    m = sub.add_parser("music", help="MUSIC on R_true / R_samp vs the CRB")
    m.add_argument("--config", required=True)
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--n", type=int, default=64)
    m.add_argument("--snr", type=float, nargs="+", default=[0.0, 10.0, 20.0])
    b = sub.add_parser("benchmark", help="reports/evaluation: ML / MUSIC / learned per nominal SNR")
    b.add_argument("--config", default="configs/default.toml")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--out", required=True)
    b.add_argument("--n", type=int, default=500, help="test scenes per condition")
    b.add_argument("--val", type=int, default=100, help="validation scenes per SNR (threshold tuning)")
    b.add_argument("--snr", type=float, nargs="+", default=[0.0, 10.0, 20.0, 30.0])
    b.add_argument("--only", type=float, nargs="+", default=None, help="compute only these conditions")
    b.add_argument("--learned", default=None, help="checkpoint of the learned detector (traindet)")
    b.add_argument("--cache", default="runs/benchmark")
    b.add_argument("--reps", type=int, default=1000, help="bootstrap resamples")
    td = sub.add_parser("traindet", help="train the learned detector (heatmap + offsets; deterministic, one thread)")
    td.add_argument("--config", default="configs/default.toml")
    td.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    td.add_argument("--out", required=True)
    tn = sub.add_parser("tunedet", help="re-tune the learned pipeline's thresholds on the training channels")
    tn.add_argument("--config", default="configs/default.toml")
    tn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tn.add_argument("--checkpoint", required=True)
    f = sub.add_parser("floors", help="loss terms for a perfect prediction (irreducible floors)")
    f.add_argument("--config", required=True)
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    f.add_argument("--n", type=int, default=64)
    return p


def _train(args: argparse.Namespace) -> None:
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    t0 = time.perf_counter()
    res = train(cfg, out_dir=out, resume=args.resume)
    print(f"trained {cfg.name}: {res.next_step} steps in {time.perf_counter() - t0:.1f} s "
          f"({res.step_time_s * 1000:.0f} ms/step, {cfg.data.batch_size / res.step_time_s:.1f} samples/s), "
          f"{res.n_skipped} skipped; final train loss {res.history[-1].loss:.4g}" if res.history else "no steps run")
    if res.val_history:
        step, val = res.val_history[-1]
        print(f"validation after step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
    print(f"checkpoint: {out / 'checkpoints' / 'last.pt'}")


def _eval(args: argparse.Namespace) -> None:
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt.cfg
    system = make_system(cfg)
    model = build_model(cfg, system)
    restore(ckpt, model)
    n = args.n if args.n is not None else cfg.data.n_test
    print(f"{cfg.name}: {count_parameters(model)} parameters, step {ckpt.next_step}, {n} test samples")
    print(format_rows(evaluate(cfg, model, n, system, with_crb=not args.no_crb, snr_db_list=args.snr)))


def _music(args: argparse.Namespace) -> None:
    from ris_model.music_eval import format_speed, run_music_eval

    cfg = load_config(args.config, args.set)
    rows, speed = run_music_eval(cfg, args.n, list(args.snr))
    print(format_rows(rows) + "\n" + format_speed(speed))


def _evalreport(args: argparse.Namespace) -> None:
    from ris_model.eval_report import write_report

    for path in write_report(args.checkpoint, Path(args.out), args.n, list(args.snr)):
        print(f"wrote {path}")


def _benchmark(args: argparse.Namespace) -> None:
    from ris_model.bench_report import write_bench_report
    from ris_model.benchmark import run_benchmark

    import torch

    torch.set_num_threads(1)  # the per-scene times in the table are one thread's
    cfg = load_config(args.config, args.set)
    learned, tag = None, "none"
    if args.learned:
        from ris_model.detector_infer import load_detector

        learned, tag = load_detector(args.learned, cfg)
    res = run_benchmark(cfg, list(args.snr), args.n, args.val, Path(args.cache), reps=args.reps, learned=learned,
                        learned_tag=tag, only=args.only)
    if learned is not None:
        res["learned"] = dict(learned.meta, checkpoint=args.learned, sha256_12=tag.split("_")[0], cache_tag=tag)
    for path in write_bench_report(res, Path(args.out)):
        print(f"wrote {path}")


def _traindet(args: argparse.Namespace) -> None:
    import torch

    from ris_model.detector import DetectorConfig
    from ris_model.detector_train import train_detector

    torch.set_num_threads(1)  # deterministic and the measured time is one thread's
    t0 = time.perf_counter()
    path = train_detector(load_config(args.config, args.set), DetectorConfig(), Path(args.out))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f} s")


def _tunedet(args: argparse.Namespace) -> None:
    import torch

    from ris_model.detector_tune import retune_checkpoint

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipeline = retune_checkpoint(Path(args.checkpoint), load_config(args.config, args.set))
    print(f"re-tuned {args.checkpoint} in {time.perf_counter() - t0:.0f} s: {pipeline}")


def _floors(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    print(format_floors(loss_floors(cfg, n=args.n), cfg))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    try:
        {"train": _train, "eval": _eval, "music": _music, "floors": _floors,
         "evalreport": _evalreport, "benchmark": _benchmark, "traindet": _traindet,
         "tunedet": _tunedet}[args.command](args)
    except (ConfigError, CheckpointError, BatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
