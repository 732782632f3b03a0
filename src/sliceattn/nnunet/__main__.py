"""``python -m sliceattn.nnunet``: add an attention configuration to an nnU-Net v2 plans file, or warm-start one.

    python -m sliceattn.nnunet add-config PLANS_JSON --name 3d_fullres_rsa --base 3d_fullres \\
        --attention rsa --stages -1
    python -m sliceattn.nnunet warm-start PLAIN_CHECKPOINT OUT.pth --plans PLANS_JSON --name 3d_fullres_rsa

A user mistake is one ``error: ...`` line on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch

from .._optional import optional_import
from ..factory import ATTENTION_BLOCKS
from ..io import save_atomically
from .plans import PlansError, add_attention_configuration, write_plans


class _UsageError(Exception):
    """A user mistake: reported as ``error: <message>`` with exit status 2."""


def _fail(message: str) -> NoReturn:
    raise _UsageError(message)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"{what} {str(path)!r} does not exist")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        _fail(f"{what} {str(path)!r} is not readable JSON: {error}")


def _parse_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        _fail(f"--attention-kwargs must be a JSON object such as '{{\"order\": [3, 4, 2]}}', got {text!r} ({error})")
    if not isinstance(value, dict):
        _fail(f"--attention-kwargs must be a JSON object such as '{{\"order\": [3, 4, 2]}}', got {text!r}")
    return value


def add_config(args: argparse.Namespace) -> None:
    """Write the new configuration into the plans file (atomic replace)."""
    plans = _read_json(args.plans, "plans file")
    if not isinstance(plans, dict):
        _fail(f"plans file {str(args.plans)!r} is not an nnU-Net plans file (not a JSON object)")
    try:
        new_plans = add_attention_configuration(
            plans,
            args.name,
            args.base,
            attention=args.attention,
            stages=args.stages,
            attention_kwargs=_parse_kwargs(args.attention_kwargs),
            force=args.force,
        )
    except PlansError as error:
        _fail(str(error))
    write_plans(args.plans, new_plans)
    print(f"{args.plans}: configuration {args.name!r} = {args.base!r} + {args.attention} after encoder stages {args.stages}")


def warm_start(args: argparse.Namespace) -> None:
    """Write a checkpoint with the plain weights and identity attention blocks for ``-pretrained_weights``."""
    from .warm_start import plain_state_dict, warm_start_state_dict

    if args.output.exists() and not args.force:
        _fail(f"output {str(args.output)!r} exists; pass --force to replace it")
    if not args.output.parent.is_dir():
        _fail(f"output folder {str(args.output.parent)!r} does not exist")
    if not args.checkpoint.is_file():
        _fail(f"checkpoint {str(args.checkpoint)!r} does not exist")
    plans = _read_json(args.plans, "plans file")
    try:
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        plain = plain_state_dict(checkpoint)
    except (OSError, RuntimeError, TypeError, AttributeError) as error:
        _fail(f"checkpoint {str(args.checkpoint)!r} is not a PyTorch checkpoint of a network: {error}")
    if args.dataset_json is not None:
        dataset_json = _read_json(args.dataset_json, "dataset.json")
    else:
        dataset_json = checkpoint.get("init_args", {}).get("dataset_json") if isinstance(checkpoint, dict) else None
        if dataset_json is None:
            _fail("the checkpoint records no dataset.json (not an nnU-Net checkpoint); pass --dataset-json")
    network = _network_from_plans(plans, args.name, dataset_json)
    try:
        state = warm_start_state_dict(network, plain)
    except (KeyError, ValueError) as error:
        _fail(f"checkpoint {str(args.checkpoint)!r} does not fit configuration {args.name!r}: {error.args[0]}")
    save_atomically(args.output, lambda temporary: torch.save({"network_weights": state}, temporary))
    print(f"{args.output}: plain weights of {args.checkpoint} + identity attention blocks of {args.name!r}")


def _network_from_plans(plans: dict[str, Any], name: str, dataset_json: dict[str, Any]) -> Any:
    """The training network of configuration ``name``, built by nnU-Net itself."""
    try:
        networks = optional_import("nnunetv2.utilities.get_network_from_plans", extra="nnunet", needed_by="warm-start")
        labels = optional_import("nnunetv2.utilities.label_handling.label_handling", extra="nnunet", needed_by="warm-start")
        plans_handler = optional_import("nnunetv2.utilities.plans_handling.plans_handler", extra="nnunet", needed_by="warm-start")
    except ImportError as error:
        _fail(str(error))
    if name not in plans.get("configurations", {}):
        _fail(f"configuration {name!r} is not in the plans file (it has {sorted(plans.get('configurations', {}))})")
    manager = plans_handler.PlansManager(plans)
    configuration = manager.get_configuration(name)
    return networks.get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        labels.determine_num_input_channels(manager, configuration, dataset_json),
        manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=True,
        deep_supervision=True,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``add-config`` and ``warm-start`` subcommands."""
    parser = argparse.ArgumentParser(prog="python -m sliceattn.nnunet", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add-config", help="add a configuration with attention to a plans file")
    add.add_argument("plans", type=Path, metavar="PLANS_JSON", help="e.g. $nnUNet_preprocessed/Dataset501_X/nnUNetPlans.json")
    add.add_argument("--name", required=True, help="new configuration, e.g. 3d_fullres_rsa")
    add.add_argument("--base", default="3d_fullres", help="3-D configuration to extend (default 3d_fullres)")
    add.add_argument("--attention", choices=sorted(ATTENTION_BLOCKS), default="rsa", help="block (default rsa)")
    add.add_argument("--stages", type=int, nargs="+", default=[-1], metavar="STAGE",
                     help="encoder stage indices, -1 = bottleneck (the paper's 010 placement; default)")
    add.add_argument("--attention-kwargs", default="{}", metavar="JSON",
                     help="block options as a JSON object, axes as dim indices, e.g. '{\"order\": [3, 4, 2]}'")
    add.add_argument("--force", action="store_true", help="replace an existing configuration of that name")
    add.set_defaults(run=add_config)
    warm = commands.add_parser("warm-start", help="plain checkpoint -> checkpoint for -pretrained_weights")
    warm.add_argument("checkpoint", type=Path, metavar="PLAIN_CHECKPOINT", help="a plain configuration's checkpoint_final.pth")
    warm.add_argument("output", type=Path, metavar="OUT_PTH", help="checkpoint to write")
    warm.add_argument("--plans", type=Path, required=True, metavar="PLANS_JSON", help="plans file holding --name")
    warm.add_argument("--name", required=True, help="the attention configuration, e.g. 3d_fullres_rsa")
    warm.add_argument("--dataset-json", type=Path, help="dataset.json (default: the one recorded in the checkpoint)")
    warm.add_argument("--force", action="store_true", help="replace OUT_PTH if it exists")
    warm.set_defaults(run=warm_start)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except _UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
