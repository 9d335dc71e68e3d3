"""The `nemocompile` command: plan, build, run, inspect. Errors are one sentence on stderr with a
non-zero exit; `--debug` shows the traceback."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from nemocompile.base.errors import NemocompileError, UsageError
from nemocompile.base.formats import BASE_PRECISIONS
from nemocompile.base.settings import override, settings
from nemocompile.pipeline import PhaseListener, PhaseRecord
from nemocompile.runtime.tokenizer import TokenText

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    sys.exit(code)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def _params(count: float) -> str:
    return f"{count / 1e9:.3f} B" if count >= 1e8 else f"{int(count):,}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Group(click.Group):
    """Every error is one line on stderr and an exit code (README, "Exit codes"): 0 success, 1 a
    failed operation, 2 a usage error. NemocompileError carries its code; click's own errors (a
    missing or unknown option, a bad value) keep click's; anything else is a failed operation.
    `--debug` shows the traceback instead."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            context = getattr(error, "ctx", None)
            message = _one_line(error.format_message())
            if isinstance(error, click.exceptions.NoArgsIsHelpError):
                message = "no command given"
            if isinstance(error, click.UsageError) and context is not None:
                message = f"{message.rstrip('.')}; see '{context.command_path} --help'."
            _fail(message, error.exit_code)
        except click.Abort:
            _fail("interrupted", 1)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)  # --help and --version return 0

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own: --help, --version, usage errors (handled in `main`)
        except NemocompileError as error:
            if settings().debug:
                raise
            _fail(_one_line(str(error)), error.exit_code)
        except Exception as error:  # a bug or an unforeseen failure: still one line, exit 1
            if settings().debug:
                raise
            _fail(f"{type(error).__name__}: {_one_line(str(error))} (rerun with --debug for the traceback)", 1)


@click.group(cls=_Group)
@click.version_option(package_name="nemocompile")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-sentence errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Compile Nemotron-H checkpoints into engines for a named NVIDIA GPU, and run them."""
    if debug:
        ctx.with_resource(override(debug=True))  # undone when the command ends


def _precision_options(command: F) -> F:
    """--precision, --override, --policy, --exclude, --world-size and the run-time bounds, shared by plan
    and build."""
    decorators = [
        click.option("--precision", type=click.Choice(["auto", *BASE_PRECISIONS]), default="auto", show_default=True,
                     help="auto: the target's policy (NVFP4 experts, FP8 shared experts and Mamba linears, "
                          "BF16 attention); bf16/fp32: one float format throughout."),
        click.option("--override", "overrides", multiple=True, metavar="COMPONENT=PRECISION",
                     help="e.g. routed_experts=fp8, routed_experts=nvfp4_w4a16, attention=bf16 (repeatable)."),
        click.option("--policy", "policy_file", type=click.Path(path_type=Path), help="TOML precision policy."),
        click.option("--exclude", multiple=True, metavar="PATTERN",
                     help="Weight names kept in the float base, e.g. 'layers.0.*' (repeatable)."),
        click.option("--act-scales", type=click.Choice(["static", "dynamic"]), default=None,
                     help="Activation scales of W4A4/W8A8 GEMMs: static (calibrated; the default) or dynamic "
                          "(FP8 per token, NVFP4 per tensor, computed on every call; no calibration)."),
        click.option("--world-size", default=1, show_default=True, type=int,
                     help="Ranks (GPUs): build splits the engine over them (tensor and expert parallel); plan "
                          "gives the bytes per GPU."),
        click.option("--max-batch-size", default=None, type=int,
                     help="Largest batch the engine accepts (bounds the graph's batch dim). Not given: 256, or "
                          "the most sequences of --max-context tokens the target's memory fits."),
        click.option("--max-context", default=None, type=int,
                     help="Longest sequence, prompt plus generated tokens, the engine accepts (bounds ctx). Not "
                          "given: 131072 (at most the model's max_position_embeddings), shrunk only when one "
                          "sequence of it does not fit."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def _stats_table(title: str, stats: Any) -> Table:
    table = Table(title=title)
    for column in ("category", "parameters", "active / token", "bytes", "bits/elem"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for name, entry in stats.categories.items():
        table.add_row(name, _params(entry.params), _params(entry.active), _human_bytes(entry.bytes),
                      f"{stats.bits_of(name):.2f}" if entry.params else "")
    table.add_section()
    table.add_row("total (without MTP)", _params(stats.params_total), _params(stats.params_active), "", "")
    table.add_row("all stored", "", "", _human_bytes(stats.bytes_total), f"{stats.bits_per_element:.2f}")
    return table


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--target", default="h100", show_default=True, help="GPU to plan for.")
@_precision_options
@click.option("--explain", is_flag=True,
              help="List per op its precision and policy rule, its kernel with its config and why, and the check.")
@click.option("--tuning-db", type=click.Path(path_type=Path), help="With --explain: the database configs come from.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def plan(config: Path, target: str, precision: str, overrides: tuple[str, ...], policy_file: Path | None,
         exclude: tuple[str, ...], act_scales: str | None, world_size: int, max_batch_size: int | None,
         max_context: int | None, explain: bool, tuning_db: Path | None, as_json: bool) -> None:
    """Plan a model from config.json alone: parameters and bytes per precision, no weights read."""
    from .options import BuildOptions
    from .planner import plan_model

    options = BuildOptions(target=target, precision=precision, overrides=overrides, policy_file=policy_file,
                           exclude=exclude, act_scales=act_scales, world_size=world_size,
                           max_batch_size=max_batch_size, max_context=max_context)
    result = plan_model(config, options)
    if explain:
        from .plan_explain import explain_plan

        rows = explain_plan(result, tuning_db)
        if as_json:
            _print_json({**result.as_json(), "explained": [row.as_json() for row in rows]})
            return
        table = Table(title=f"{escape(result.name)} on {result.target.name}: explained plan (prefill graph)")
        for column in ("op", "scope", "precision", "policy rule", "kernel", "config", "why", "check"):
            table.add_column(column)
        for row in rows:
            table.add_row(row.op, row.scope, row.precision, escape(row.rule), row.kernel, row.config, escape(row.why),
                          escape(row.check))
        stdout.print(table)
        return
    if as_json:
        _print_json(result.as_json())
        return
    stdout.print(_stats_table(f"{escape(result.name)}: {len(result.config.layer_kinds)} layers "
                              f"({result.config.pattern}) on {result.target.name}, {precision}", result.stats))
    stats = result.stats
    stdout.print(f"active per token without embeddings: {_params(stats.params_active_without_embeddings)}; "
                 f"MTP: {_params(stats.params_mtp)}; {stats.bits_per_element:.2f} bits per element",
                 highlight=False)
    stdout.print(_memory_table(result.memory))
    memory = result.memory
    longest = memory.largest_context(1)
    stdout.print(f"KV cache {_human_bytes(memory.kv_bytes_per_token)} per token and Mamba state "
                 f"{_human_bytes(memory.ssm_state_bytes_per_sequence)} per sequence, per GPU; largest context at "
                 f"batch 1: {'unbounded (no attention layer)' if longest is None else f'{longest:,} tokens'}; "
                 f"{_human_bytes(result.bytes_per_gpu)} per GPU at world size {world_size} of "
                 f"{_human_bytes(result.target.memory_bytes)}: {'fits' if result.fits else 'does NOT fit'}; "
                 f"planned in {result.seconds:.2f} s", highlight=False)
    if result.bounds.shrunk:
        stdout.print(f"bounds: {result.bounds.describe()}", highlight=False)


def _memory_table(memory: Any) -> Table:
    batch, context = memory.max_batch, memory.max_context
    table = Table(title=f"memory per GPU at batch {batch} x context {context:,} "
                        f"(tp {memory.parallelism.tp}, ep {memory.parallelism.ep})")
    table.add_column("part", justify="left")
    table.add_column("bytes", justify="right")
    for name, size in memory.parts(batch, context).items():
        table.add_row(name, _human_bytes(size))
    table.add_section()
    table.add_row("total", _human_bytes(memory.bytes_per_gpu))
    table.add_row("GPU memory", _human_bytes(memory.target.memory_bytes))
    return table


def _phase_progress(done: int, total: int | None, unit: str, seconds: float) -> str:
    """How far a phase got: bytes with their rate (and, running, the time left), or a count."""
    if unit == "bytes":
        rate = done / max(seconds, 1e-9)
        text = f"{_human_bytes(done)}" + (f" of {_human_bytes(total)}" if total is not None else "")
        text += f", {_human_bytes(rate)}/s"
        if total is not None and 0 < done < total:
            text += f", ETA {(total - done) / max(rate, 1e-9):.0f} s"
        return text
    if not unit:
        return ""
    return f"{done}" + (f" of {total}" if total is not None else "") + f" {unit}"


class _PhaseLog:
    """Not on a terminal: one line per phase with its time, printed to stderr once the build has
    succeeded (a failed build prints only its one-line error)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def phase_started(self, name: str, total: int | None, unit: str) -> None:
        pass

    def phase_advanced(self, done: int, total: int | None, unit: str, detail: str) -> None:
        pass

    def phase_ended(self, record: PhaseRecord) -> None:
        counted = _phase_progress(record.done, record.total, record.unit, record.seconds)
        parts = [f"{record.seconds:.2f} s", *([counted] if counted else []), *([record.summary] if record.summary else [])]
        self.lines.append(f"[{record.name}] " + "; ".join(parts))


class _PhaseDisplay:
    """On a terminal: a Rich progress display, one row per phase, each with its own progress."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.started = 0.0

    def phase_started(self, name: str, total: int | None, unit: str) -> None:
        self.task = self.progress.add_task(name, total=total, detail="")
        self.started = time.perf_counter()

    def phase_advanced(self, done: int, total: int | None, unit: str, detail: str) -> None:
        if self.task is None:
            return
        counted = _phase_progress(done, total, unit, time.perf_counter() - self.started)
        text = ", ".join(part for part in (counted, escape(detail)) if part)
        self.progress.update(self.task, completed=done, total=total, detail=text)

    def phase_ended(self, record: PhaseRecord) -> None:
        if self.task is None:
            return
        counted = _phase_progress(record.done, record.total, record.unit, record.seconds)
        text = "; ".join(escape(part) for part in (counted, record.summary) if part)
        total = record.total if record.total is not None else max(record.done, 1)
        self.progress.update(self.task, completed=total, total=total, detail=text)
        self.progress.stop_task(self.task)
        self.task = None


@contextmanager
def _build_progress(mode: str) -> Iterator[PhaseListener | None]:
    """What follows the build's phases: a Rich display ("display"), one log line per phase ("log"),
    or nothing ("quiet": --json, or --print-after, whose IR text owns stderr)."""
    if mode == "quiet":
        yield None
        return
    if mode == "log":
        log = _PhaseLog()
        yield log
        for line in log.lines:  # not reached when the build failed
            click.echo(line, err=True)
        return
    # the phase names keep their width; a long detail (the passes phase lists every step) is cut instead
    columns = (TextColumn("{task.description:<18}", table_column=Column(min_width=18, no_wrap=True)),
               BarColumn(bar_width=30), TimeElapsedColumn(),
               TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis")))
    with Progress(*columns, console=stderr, transient=False) as progress:
        yield _PhaseDisplay(progress)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--target", required=True, help="GPU to build for (h100, h200, b200, gb200).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Engine directory.")
@_precision_options
@click.option("--calibrate", default=8, show_default=True, type=int,
              help="Samples (token sequences) run through the unquantized model to set activation scales "
                   "(W4A4, W8A8).")
@click.option("--calibration-data", type=click.Path(path_type=Path),
              help="Calibration data: token ids (one sequence per line), text, or JSONL with a 'text' field, "
                   "tokenized with the checkpoint's tokenizer.json (default: random tokens).")
@click.option("--calibration-format", type=click.Choice(["auto", "tokens", "text", "jsonl"]), default="auto",
              show_default=True, help="How to read --calibration-data (auto: .jsonl is JSONL, a file "
                                      "starting with an integer is token ids, anything else is text).")
@click.option("--calibration-length", type=int, default=None,
              help="Tokens per calibration sample [default: 64, within --max-context].")
@click.option("--calibration-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where calibration runs the model, one block at a time (cuda: one GPU).")
@click.option("--force", is_flag=True, help="Replace an existing engine directory.")
@click.option("--resume", is_flag=True,
              help="Continue a killed build of OUT from its last verified weight (same input and options).")
@click.option("--print-after", multiple=True,
              help="Print the IR after this pipeline step ('all' for every step); repeatable.")
@click.option("--time-passes", is_flag=True, help="Print each pipeline step's time and counts to stderr.")
@click.option("--tensorrt", is_flag=True,
              help="Also export ONNX for TensorRT to tensorrt/ (and build the TensorRT engine where it is installed).")
@click.option("--tuning-db", type=click.Path(path_type=Path),
              help="Tuning database (`nemocompile tune`) the kernel configs come from; without it the cost model "
                   "picks them. Entries recorded for another GPU or version are named and not used.")
@click.option("--tp", default=None, type=int,
              help="Tensor-parallel ranks: 1 or the world size (the default): attention, Mamba, MLPs, vocabulary.")
@click.option("--ep", default=None, type=int,
              help="Expert-parallel ranks: 1 or the world size (the default): the routed experts.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def build(model: Path | None, target: str, out: Path, precision: str, overrides: tuple[str, ...],
          policy_file: Path | None, exclude: tuple[str, ...], act_scales: str | None, world_size: int,
          tp: int | None, ep: int | None, max_batch_size: int | None,
          max_context: int | None, calibrate: int,
          calibration_data: Path | None, calibration_format: str, calibration_length: int | None,
          calibration_device: str, force: bool, resume: bool, print_after: tuple[str, ...],
          time_passes: bool, tensorrt: bool, tuning_db: Path | None, as_json: bool) -> None:
    """Compile MODEL (a Hugging Face Nemotron-H directory; default: the embedded demo) into an engine."""
    from .driver import build as run_build
    from .options import BuildOptions
    from .pipeline import record_json, timing_table

    def printer(step_name: str, text: str) -> None:
        stderr.print(f"// ----- IR after {step_name} -----", highlight=False)
        click.echo(text, err=True)

    options = BuildOptions(target=target, precision=precision, overrides=overrides, policy_file=policy_file,
                           exclude=exclude, act_scales=act_scales, calibrate=calibrate,
                           calibration_data=calibration_data, calibration_format=calibration_format,
                           calibration_length=calibration_length, calibration_device=calibration_device,
                           world_size=world_size, tp=tp, ep=ep, max_batch_size=max_batch_size,
                           max_context=max_context, force=force, tensorrt=tensorrt, resume=resume,
                           print_after=frozenset(print_after), tuning_db=tuning_db)
    mode = ("quiet" if as_json or print_after else "display" if settings().progress and stderr.is_terminal
            else "log")
    with _build_progress(mode) as listener:
        result = run_build(model, out, options, printer, listener)
    if result.bounds is not None and result.bounds.shrunk:
        click.echo(f"bounds: {result.bounds.describe()}", err=True)
    if time_passes:
        click.echo(timing_table(result.passes), err=True)
    if result.tensorrt_skipped:
        click.echo(result.tensorrt_skipped, err=True)
    for entry, why in result.skipped_tuning:
        click.echo(f"tuning database entry not used: {entry}: {why}", err=True)
    for message in result.rejected_configs:
        click.echo(message, err=True)
    summary = {"engine": str(result.out), "target": result.manifest.target.name, "precision": precision,
               "policy": result.manifest.policy.to_json(), "params_total": result.stats.params_total,
               "world_size": result.manifest.world_size, "planned_world_size": world_size,
               "bounds": result.bounds.as_json() if result.bounds is not None else None,
               "kernels": result.manifest.kernel_counts(),
               "bytes_written": result.bytes_written, "bits_per_element": round(result.stats.bits_per_element, 4),
               "seconds": round(result.seconds, 3),
               "passes": [record_json(r) for r in result.passes],
               "phases": [phase.as_json() for phase in result.phases],
               "calibration": result.calibration.as_json() if result.calibration else None,
               "quantization_errors": [{"weight": e.weight, "format": e.format, "rel_rms": e.rel_rms,
                                        "sqnr_db": e.sqnr_db} for e in result.errors],
               "agreement": result.agreement.as_json() if result.agreement else None,
               "deviation": result.deviation.as_json() if result.deviation else None,
               "tensorrt": result.manifest.tensorrt.to_json() if result.manifest.tensorrt else None,
               "kernel_configs": [c.to_json() for c in result.manifest.kernel_configs],
               "skipped_tuning_entries": [{"entry": e, "why": w} for e, w in result.skipped_tuning],
               "rejected_configs": list(result.rejected_configs)}
    if as_json:
        _print_json(summary)
        return
    rate = result.bytes_written / max(result.seconds, 1e-9)
    agreement = (f"; top-1 agreement with {result.manifest.policy.base} {result.agreement.top1:.3f}, "
                 f"mean KL {result.agreement.mean_kl:.2e}" if result.agreement else "")
    stdout.print(f"built {escape(str(result.out))} for {summary['target']} ({precision}): "
                 f"{_params(result.stats.params_total)} parameters, {_human_bytes(result.bytes_written)} "
                 f"({result.stats.bits_per_element:.2f} bits per element) in {result.seconds:.2f} s "
                 f"({_human_bytes(rate)}/s){agreement}", highlight=False)


def _start_ranks(engine: Path, world_size: int, params: dict[str, Any]) -> bool:
    """Start `world_size` ranks running this `run` (True), unless this process is one of them or the
    engine runs on one rank (False). The engine's own rank count is checked first."""
    from .runtime.distributed import launched_world_size
    from .runtime.engine_files import read_manifest

    if world_size < 1:
        raise UsageError(f"--world-size must be at least 1, got {world_size}")
    built = read_manifest(engine).world_size
    if built != world_size:
        raise UsageError(f"engine {engine} was built for {built} rank{'s' if built > 1 else ''}; it cannot be "
                         f"started with --world-size {world_size}")
    if world_size == 1 or launched_world_size() > 1:
        return False
    from .launch import spawn_ranks

    arguments = ["--debug"] if settings().debug else []
    arguments += ["run", str(engine), "--max-new-tokens", str(params["max_new_tokens"]),
                  "--temperature", repr(params["temperature"]), "--top-p", repr(params["top_p"])]
    arguments += [f"--input-ids={ids}" for ids in params["input_ids"]]
    arguments += [f"--prompt={text}" for text in params["prompt"]]
    if params["seed"] is not None:
        arguments += ["--seed", str(params["seed"])]
    if params["as_json"]:
        arguments.append("--json")
    if params["backend"] is not None:
        arguments += ["--backend", params["backend"]]
    if params["compile_decode"]:
        arguments.append("--compile")
    spawn_ranks(world_size, [*arguments, "--world-size", str(world_size)])
    return True


def _rank() -> int:
    from .runtime.distributed import current

    return current().rank


def _consume(loaded: Any, input_ids: tuple[str, ...], prompt: tuple[str, ...], max_new_tokens: int,
             temperature: float, top_p: float, seed: int | None) -> None:
    """A rank other than 0: the same steps as rank 0 (its collectives need them), printing nothing."""
    batch = ([loaded.tokenizer.encode(text) for text in prompt] if prompt and loaded.tokenizer is not None
             else [_parse_ids(text) for text in input_ids])
    eos = loaded.config.get("eos_token_id")
    for _ in loaded.stream(batch, max_new_tokens, temperature, top_p, seed, [eos] if isinstance(eos, int) else None):
        pass


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UsageError(f"--input-ids must be comma-separated integers, got '{text}'") from None


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--input-ids", multiple=True, help="Prompt token ids, e.g. 1,2,3 (repeat for a batch).")
@click.option("--prompt", multiple=True, help="Prompt text (engines with a tokenizer; repeat for a batch).")
@click.option("--max-new-tokens", default=16, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
@click.option("--json", "as_json", is_flag=True, help='Print {"generated_ids": [[...]]}.')
@click.option("--turns", type=click.Path(path_type=Path), default=None,
              help="A conversation, one turn per line (text, or token ids for an engine without a tokenizer): "
                   "each turn is appended to the same sequence state and only its tokens are processed.")
@click.option("--load-state", type=click.Path(path_type=Path), default=None,
              help="Continue the sequence saved in this snapshot (a safetensors file from --save-state).")
@click.option("--save-state", type=click.Path(path_type=Path), default=None,
              help="Save the sequence's state (one sequence) to this safetensors file at the end.")
@click.option("--backend", type=click.Choice(["triton", "reference"]), default=None,
              help="triton: the engine's Triton kernels (interpreted on a CPU); reference: the reference ops. "
                   "Default: triton with a GPU and kernels, else reference.")
@click.option("--world-size", default=None, type=int,
              help="Ranks to start, one process each (an engine built for N ranks needs N); under torchrun, "
                   "the ranks torchrun started.")
@click.option("--compile", "compile_decode", is_flag=True,
              help="CPU: compile the decode step with torch.compile (tens of seconds on the first step of each "
                   "batch size; then float32 engines decode 2-3x faster, bf16 ones about 1.25x).")
def run(engine: Path, input_ids: tuple[str, ...], prompt: tuple[str, ...], max_new_tokens: int,
        temperature: float, top_p: float, seed: int | None, as_json: bool, turns: Path | None,
        load_state: Path | None, save_state: Path | None, backend: str | None, world_size: int | None,
        compile_decode: bool) -> None:
    """Generate tokens with ENGINE. Prompts of a batch may differ in length; a single prompt's text is
    printed as it is generated. --turns feeds a conversation turn by turn into one sequence state. A
    sharded engine runs as --world-size processes; rank 0 prints."""
    from .api import load

    if sum(map(bool, (input_ids, prompt, turns))) != 1:
        raise UsageError("give exactly one of --input-ids, --prompt or --turns")
    conversation = turns is not None or load_state is not None or save_state is not None
    if world_size is not None and world_size > 1 and conversation:
        raise UsageError("--turns, --load-state and --save-state run one-rank engines; drop --world-size")
    if world_size is not None and _start_ranks(engine, world_size, click.get_current_context().params):
        return
    chosen: Literal["reference", "triton"] | None = (
        None if backend is None else "triton" if backend == "triton" else "reference")
    loaded = load(engine, backend=chosen, compile=compile_decode or None)
    if conversation:
        if loaded.manifest.world_size > 1:
            raise UsageError("--turns, --load-state and --save-state run one-rank engines")
        _run_conversation(loaded, input_ids, prompt, turns, load_state, save_state, max_new_tokens, temperature,
                          top_p, seed, as_json)
        return
    if _rank() != 0:  # every rank computes every token; rank 0 prints them
        _consume(loaded, input_ids, prompt, max_new_tokens, temperature, top_p, seed)
        return
    if prompt:
        if loaded.tokenizer is None:
            raise UsageError(f"engine {engine} has no tokenizer; use --input-ids")
        batch = [loaded.tokenizer.encode(text) for text in prompt]
    else:
        batch = [_parse_ids(text) for text in input_ids]
    eos = loaded.config.get("eos_token_id")
    stops = [eos] if isinstance(eos, int) else None
    # Everything (bounds, ids, sampling options) is checked here, before the first step runs.
    steps = loaded.stream(batch, max_new_tokens, temperature, top_p, seed, stops)
    start = time.perf_counter()
    generated: list[list[int]] = [[] for _ in batch]
    live = not as_json and len(batch) == 1  # one sequence: its text is printed as it is generated
    text = TokenText(loaded.tokenizer)
    for step in steps:
        for row, token in enumerate(step.tokens):
            if token is not None:
                generated[row].append(token)
        if live and step.tokens[0] is not None:
            piece = text.add(step.tokens[0])
            if piece:
                stdout.file.write(piece)
                stdout.file.flush()
    seconds = time.perf_counter() - start
    if as_json:
        _print_json({"generated_ids": generated})
        return
    if live:
        stdout.file.write(text.finish() + "\n")
        stdout.file.flush()
    else:
        for tokens in generated:
            stdout.print(TokenText(loaded.tokenizer).all(tokens), highlight=False, markup=False)
    stderr.print(f"{sum(map(len, generated))} tokens in {seconds:.2f} s", highlight=False)


def _run_conversation(loaded: Any, input_ids: tuple[str, ...], prompt: tuple[str, ...], turns_file: Path | None,
                      load_state: Path | None, save_state: Path | None, max_new_tokens: int, temperature: float,
                      top_p: float, seed: int | None, as_json: bool) -> None:
    """`run --turns`, `--load-state`, `--save-state`: one sequence, continued turn by turn."""
    from nemocompile.runtime.conversation import TurnResult, converse, read_turns
    from nemocompile.runtime.engine import Engine

    if not isinstance(loaded, Engine):
        raise UsageError("--turns, --load-state and --save-state need the nemocompile runtime, not an ONNX engine")
    continuing = load_state is not None
    if turns_file is not None:
        turns = read_turns(turns_file, loaded.tokenizer, continuing)
    elif prompt:
        if loaded.tokenizer is None:
            raise UsageError(f"engine {loaded.directory} has no tokenizer; use --input-ids")
        turns = [loaded.tokenizer.encode(text, add_bos=not continuing) for text in prompt]
    else:
        turns = [_parse_ids(text) for text in input_ids]
    if len(turns) > 1 and turns_file is None:
        raise UsageError("--load-state and --save-state continue one sequence: give one --input-ids or --prompt "
                         "(or a conversation with --turns)")
    cache = loaded.load_state(load_state) if load_state is not None else loaded.new_cache(1)
    eos = loaded.config.get("eos_token_id")
    text = TokenText(loaded.tokenizer)

    def show(token: int) -> None:
        piece = text.add(token)
        if piece:
            stdout.file.write(piece)
            stdout.file.flush()

    def turn_done(number: int, result: TurnResult) -> None:
        if not as_json:
            stdout.file.write(text.finish() + "\n")
            stdout.file.flush()
            stderr.print(f"turn {number + 1}: {result.processed_tokens} tokens processed, "
                         f"{len(result.generated_ids)} generated, {result.context_tokens} in the state, "
                         f"{result.seconds:.2f} s", highlight=False)

    results = converse(loaded, turns, cache, max_new_tokens, temperature, top_p, seed,
                       [eos] if isinstance(eos, int) else None, None if as_json else show, turn_done)
    if save_state is not None:
        loaded.save_state(cache, 0, save_state)
    if as_json:
        if turns_file is None:
            _print_json({"generated_ids": [results[0].generated_ids]})
        else:
            _print_json({"turns": [result.as_json() for result in results]})


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise UsageError(f"--batch-sizes must be comma-separated integers, got '{text}'") from None
    if not sizes:
        raise UsageError("--batch-sizes names no batch size")
    return sizes


def _parse_budget(text: str) -> float:
    """10m, 90s, 1h or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise UsageError(f"--budget must be a duration such as 10m, 90s or 1h, got '{text}'") from None
    if value <= 0:
        raise UsageError(f"--budget must be positive, got '{text}'")
    return value


class _SweepBar:
    """A Rich progress bar per kernel sweep, with the best time so far."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None

    def started(self, label: str, total: int) -> None:
        self.task = self.progress.add_task(label, total=total, detail="")

    def advanced(self, done: int, best: float, best_config: str) -> None:
        if self.task is not None:
            text = f"best {best * 1e6:.2f} us ({best_config})" if best != float("inf") else "best: none yet"
            self.progress.update(self.task, completed=done, detail=escape(text))

    def ended(self) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
            self.task = None


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--target", default=None, help="GPU to tune for (default: the engine's; same arch).")
@click.option("--kernels", default=None, metavar="PATTERN",
              help="Only kernels whose template, kernel or op name, or OP/TEMPLATE (moe_expert_down/moe_nvfp4_gemm), "
                   "matches this pattern (fnmatch).")
@click.option("--batch-sizes", default="1,8,64,256", show_default=True, help="Tokens per call to tune for.")
@click.option("--budget", default="10m", show_default=True, help="Stop starting configs after this long (10m, 90s).")
@click.option("--db", "db", default="tuning.sqlite", show_default=True, type=click.Path(path_type=Path),
              help="Tuning database to write (created when missing; resumed when it holds an interrupted sweep).")
@click.option("--cost-model", is_flag=True, help="Rank configs by the roofline cost model (no GPU); entries are "
                                                 "marked modelled.")
@click.option("--report-dir", type=click.Path(path_type=Path), default=None,
              help="Where report.md and the plots go [default: <db>-report next to the database].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def tune(engine: Path, target: str | None, kernels: str | None, batch_sizes: str, budget: str, db: Path,
         cost_model: bool, report_dir: Path | None, as_json: bool) -> None:
    """Tune ENGINE's Triton kernels: sweep each one's config space per batch size and record the fastest
    config that passes the numerics gate in a tuning database (`build --tuning-db`)."""
    from .tune import TuneOptions, tune_engine
    from .tune_report import COLUMNS, summary_rows

    options = TuneOptions(target=target, kernels=kernels, batch_sizes=_parse_batch_sizes(batch_sizes),
                          budget_seconds=_parse_budget(budget), db=db, cost_model=cost_model, report_dir=report_dir)
    show = not as_json and settings().progress and stderr.is_terminal
    if show:
        columns = (TextColumn("{task.description:<48}"), BarColumn(bar_width=24), TimeElapsedColumn(),
                   TextColumn("{task.fields[detail]}"))
        with Progress(*columns, console=stderr, transient=False) as progress:
            result = tune_engine(engine, options, listener=_SweepBar(progress))
    else:
        result = tune_engine(engine, options)
    rows = summary_rows(result.sweeps)
    if as_json:
        _print_json({"engine": str(engine), "target": result.target.name, "scorer": result.scorer, "db": str(db),
                     "report": str(result.report), "plots": [str(p) for p in result.plots],
                     "wall_seconds": round(result.wall_seconds, 3), "cpu_seconds": round(result.cpu_seconds, 3),
                     "stopped": result.stopped, "unmeasured": result.unmeasured, "sweeps": [dict(zip(COLUMNS, row, strict=True)) for row in rows]})
        return
    table = Table(title=f"tuned {escape(str(engine))} for {result.target.name} ({result.scorer})")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    stdout.print(table)
    for sweep in result.sweeps:
        for message in sweep.rejected:
            stderr.print(escape(message), highlight=False)
    if result.stopped:
        stderr.print(escape(result.stopped), highlight=False)
    if result.unmeasured:
        stderr.print(f"not measured on the device (tune them with --cost-model): {', '.join(result.unmeasured)}",
                     highlight=False)
    stdout.print(f"database {escape(str(db))}; report {escape(str(result.report))}, {len(result.plots)} plots; "
                 f"{result.wall_seconds:.2f} s wall, {result.cpu_seconds:.2f} s CPU", highlight=False)


@main.command()
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--no-verify", is_flag=True,
              help="Forensics: describe the manifest and graph as they are, without checking hashes, "
                   "config or weights (by default inspect checks everything run checks).")
def inspect(engine: Path, as_json: bool, no_verify: bool) -> None:
    """Describe an engine: layers, parameters by category, precision, kernels, bytes, files."""
    from .inspection import inspect_engine

    info = inspect_engine(engine, verify=not no_verify)
    if as_json:
        _print_json(info.as_json())
        return
    m = info.manifest
    stdout.print(f"engine {escape(str(engine))}: {escape(m.source.name)} for {m.target.name} ({m.target.arch}), "
                 f"{m.precision}, world size {m.world_size}, format {m.format_version}"
                 f"{'' if info.verified else ' (NOT verified: --no-verify)'}", highlight=False)
    layers = Table(title="layers")
    layers.add_column("layer", justify="right")
    layers.add_column("block")
    for index, kind in enumerate(info.layers):
        layers.add_row(str(index), kind)
    stdout.print(layers)
    stdout.print(_stats_table("parameters", info.stats))
    kernels = Table(title="kernels")
    for column in ("graph", "op", "kernel", "backend"):
        kernels.add_column(column)
    kernels.add_column("ops", justify="right")
    for use in m.kernels:
        kernels.add_row(use.graph, use.op, use.kernel, use.backend, str(use.count))
    stdout.print(kernels)
    files = Table(title="files")
    files.add_column("file")
    files.add_column("bytes", justify="right")
    files.add_column("sha256")
    for name, entry in m.files.items():
        files.add_row(name, _human_bytes(entry.size), entry.sha256[:16])
    stdout.print(files)


if __name__ == "__main__":
    main()
