"""`megatron-rl`: the package's command line.

    megatron-rl demo [key=value ...]                      the embedded default job (tiny model, CPU)
    megatron-rl train --config FILE [key=value ...]       an RLVR job (under torchrun for several ranks)
    megatron-rl convert hf-to-megatron ARGS               HF checkpoint -> Megatron dist-checkpoint
    megatron-rl convert megatron-to-hf ARGS               Megatron dist-checkpoint -> HF safetensors
    megatron-rl plan --config FILE --nodes N --gpus-per-node G --gpu-memory GiB

Each subcommand imports only what it needs, so `plan` runs on a login node without megatron or vLLM.
"""

from __future__ import annotations

import argparse
import sys

DEMO_CONFIG = "examples/tiny_cpu/config.yaml"


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl train", description="Run an RLVR job.")
    parser.add_argument("--config", required=True, help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args(argv)
    from megatron_rl.trainer.loop import run

    return run(args.config, args.overrides)


def _demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl demo",
                                     description="Build the tiny task + policy offline, then run DPPO RLVR.")
    parser.add_argument("--config", default=DEMO_CONFIG)
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    args = parser.parse_args(argv)
    from megatron_rl.trainer.loop import run_demo

    return run_demo(args.config, args.overrides)


def _convert(argv: list[str]) -> int:
    if not argv or argv[0] not in ("hf-to-megatron", "megatron-to-hf"):
        print("usage: megatron-rl convert {hf-to-megatron,megatron-to-hf} ...", file=sys.stderr)
        return 2
    from megatron_rl.megatron import hf_checkpoint

    main = hf_checkpoint.hf_to_megatron_main if argv[0] == "hf-to-megatron" else hf_checkpoint.megatron_to_hf_main
    return main(argv[1:]) or 0


def _plan(argv: list[str]) -> int:
    from megatron_rl.trainer.plan import plan_main

    return plan_main(argv)


COMMANDS = {"train": _train, "demo": _demo, "convert": _convert, "plan": _plan}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
