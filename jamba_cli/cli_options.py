"""The options `jamba run` and `jamba chat` share, declared once.

`shared_options` puts them into a command's signature, after the command's own, where Typer reads them, and
hands the command body one `Shared` value: the sampling options as a `SamplingParams` (whose ranges are
checked there), the loading options as a `ModelOptions`, and the rest as they came.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import typer

from .defaults import INT8_SKIP, INT8_THRESHOLD, MAX_TOKENS
from .errors import SamplingError

if TYPE_CHECKING:
    from .sample import SamplingParams


class Format(str, Enum):
    text = "text"
    json = "json"
    jsonl = "jsonl"


class Color(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class DType(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Kernels(str, Enum):
    auto = "auto"
    torch = "torch"


class Quant(str, Enum):
    int8 = "int8"
    fp8 = "fp8"


class Int8Backend(str, Enum):
    auto = "auto"
    ours = "ours"
    bitsandbytes = "bitsandbytes"


def _complete_model(incomplete: str) -> list[str]:
    """Repo ids in the local Hugging Face cache, and directories, that start with what was typed."""
    from .hub import cached_repo_ids

    out = [r for r in cached_repo_ids() if r.startswith(incomplete)]
    base, _, stem = incomplete.rpartition("/")
    try:
        with os.scandir(os.path.expanduser(base or ".")) as entries:
            out += [f"{base}/{e.name}" if base else e.name for e in entries
                    if e.is_dir() and e.name.startswith(stem) and not e.name.startswith(".")]
    except OSError:
        pass
    return sorted(set(out))


ModelOpt = Annotated[str | None, typer.Option("--model", "-m", envvar="JAMBA_MODEL", show_envvar=True,
                                              autocompletion=_complete_model,
                                              help="Checkpoint directory or Hub repo id (default: the bundled model)")]
RevisionOpt = Annotated[str | None, typer.Option(help="Branch, tag or commit of a Hub repo.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Download a missing model without asking.")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
SystemFileOpt = Annotated[Path | None, typer.Option("--system-file", help="Read the system prompt from a file.")]
MaxTokOpt = Annotated[int | None, typer.Option("--max-tokens", "-n", help="Most tokens to generate "
                                               f"(default: generation_config.json, else {MAX_TOKENS}).")]
TempOpt = Annotated[float | None, typer.Option("--temperature", "--temp",
                                               help="0 is greedy (default: generation_config.json, else 0).")]
TopKOpt = Annotated[int | None, typer.Option(help="Sample from the k most likely tokens (0: off).")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling: keep tokens up to this probability mass.")]
MinPOpt = Annotated[float | None, typer.Option(help="Drop tokens below this fraction of the top probability.")]
PenaltyOpt = Annotated[float | None, typer.Option(help="Penalise tokens already seen (1: off).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling (default: random, shown by --format json).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable); not printed.")]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-text tokens.")]
DTypeOpt = Annotated[DType, typer.Option(help="Weight dtype (auto: bf16 on GPU, fp32 on CPU when it fits).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: cuda if available).")]
KernelsOpt = Annotated[Kernels, typer.Option(help="auto: our Triton kernels on CUDA (causal-conv1d's conv where "
                                             "installed); torch: plain PyTorch everywhere.")]
DeviceMapOpt = Annotated[str | None, typer.Option(help="Split the model over devices: auto, balanced, "
                                                  "balanced_low_0, sequential, or a JSON file of module -> device.")]
MaxMemOpt = Annotated[str | None, typer.Option(help="Memory per device for the map, e.g. 0=70GiB,1=80GiB,cpu=200GiB.")]
OffloadOpt = Annotated[Path | None, typer.Option(help="Folder for weights that fit nowhere else (memory-mapped).")]
Load8Opt = Annotated[bool, typer.Option("--load-in-8bit", help="Quantize weights to 8 bit: on CUDA our kernels "
                                        "(fp8 on Ada/Hopper and newer, int8 before), on CPU bitsandbytes.")]
QuantOpt = Annotated[Quant | None, typer.Option(help="8-bit format of our kernels, wherever the model runs "
                                                "(implies --load-in-8bit).")]
BackendOpt = Annotated[Int8Backend, typer.Option(help="8-bit kernels: auto (ours on CUDA, bitsandbytes on CPU), "
                                                 "ours, or bitsandbytes (LLM.int8).")]
Load4Opt = Annotated[bool, typer.Option("--load-in-4bit", help="Quantize weights to 4 bit (bitsandbytes).")]
SkipOpt = Annotated[str, typer.Option(help="Modules left unquantized (comma-separated name parts).")]
ThresholdOpt = Annotated[float, typer.Option(min=0.0, help="LLM.int8 outlier threshold for 8-bit.")]
CtxOpt = Annotated[int | None, typer.Option("--ctx-size", min=1, help="Most tokens the context may hold "
                                            "(default: the model's max_position_embeddings); on a GPU, "
                                            "chat sets its cache aside up front.")]
ToolsOpt = Annotated[Path | None, typer.Option("--tools", help="Functions the model may call: a JSON file of OpenAI "
                                               "tool definitions.")]
DocOpt = Annotated[list[Path] | None, typer.Option("--doc", help="A document to answer from (repeatable): text, "
                                                   "titled with its file name, or .json/.jsonl of {title, text}.")]
CitationsOpt = Annotated[bool, typer.Option("--citations", help="Citation mode: the answer names the documents "
                                            "it used (a Sources line; json: citations).")]
ShowThinkingOpt = Annotated[bool, typer.Option("--show-thinking", help="Write a reasoning model's thinking to "
                                               "stdout too (on a terminal it is shown dim on stderr).")]
ThinkOpt = Annotated[bool | None, typer.Option("--think/--no-think", help="Turn a reasoning model's thinking on "
                                               "or off (default: the template's).", show_default=False)]
BudgetOpt = Annotated[int | None, typer.Option("--reasoning-budget", min=0, help="End thinking after this many "
                                               "tokens by writing the closing tag.")]
SpecialOpt = Annotated[bool, typer.Option("--special", help="Show control tokens (<|eom|>, <|im_end|>...) in "
                                          "the output.")]
StatsOpt = Annotated[bool, typer.Option("--stats", help="Print load time, speeds and memory on stderr.")]
ColorOpt = Annotated[Color, typer.Option(help="Colour on stderr (auto: on a TTY, unless NO_COLOR is set).")]


def _shared(
    model: ModelOpt = None, revision: RevisionOpt = None, yes: YesOpt = False,
    system: SystemOpt = None, system_file: SystemFileOpt = None,
    max_tokens: MaxTokOpt = None, temperature: TempOpt = None, top_k: TopKOpt = None, top_p: TopPOpt = None,
    min_p: MinPOpt = None, repetition_penalty: PenaltyOpt = None, seed: SeedOpt = None, stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    dtype: DTypeOpt = DType.auto, device: DeviceOpt = None, kernels: KernelsOpt = Kernels.auto,
    device_map: DeviceMapOpt = None, max_memory: MaxMemOpt = None, offload_folder: OffloadOpt = None,
    load_in_8bit: Load8Opt = False, quant: QuantOpt = None, int8_backend: BackendOpt = Int8Backend.auto,
    load_in_4bit: Load4Opt = False, int8_skip: SkipOpt = ",".join(INT8_SKIP),
    int8_threshold: ThresholdOpt = INT8_THRESHOLD, context_size: CtxOpt = None,
    tools: ToolsOpt = None, documents: DocOpt = None, citations: CitationsOpt = False,
    show_thinking: ShowThinkingOpt = False, think: ThinkOpt = None, reasoning_budget: BudgetOpt = None,
    special: SpecialOpt = False,
    stats: StatsOpt = False, color: ColorOpt = Color.auto,
) -> None:
    """The options `run` and `chat` share, in the order --help lists them (a signature only; never called).
    Each name is the library's for the same thing (`context_size`), so library messages map to the flags."""


class ModelOptions(NamedTuple):  # NamedTuple, not dataclass: built at import, it must not slow --help
    """Which model to load, and how."""

    model: str | None
    revision: str | None
    yes: bool
    dtype: DType
    device: str | None
    kernels: Kernels
    device_map: str | None
    max_memory: str | None
    offload_folder: Path | None
    load_in_8bit: bool
    quant: Quant | None
    int8_backend: Int8Backend
    load_in_4bit: bool
    int8_skip: str
    int8_threshold: float

    def load_arguments(self) -> dict:
        """The keyword arguments of `jamba_cli.load` besides the checkpoint."""
        return dict(dtype=None if self.dtype == DType.auto else self.dtype.value, device=self.device,
                    device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder,
                    load_in_8bit=self.load_in_8bit, load_in_4bit=self.load_in_4bit, int8_skip=self.int8_skip,
                    int8_threshold=self.int8_threshold, quant=self.quant.value if self.quant else None,
                    int8_backend=self.int8_backend.value, kernels=self.kernels.value)


class FeatureOptions(NamedTuple):
    """Tools, documents, citations, thinking and control tokens (features.py)."""

    tools: Path | None
    documents: list[Path] | None
    citations: bool
    show_thinking: bool
    think: bool | None
    reasoning_budget: int | None
    special: bool

    def features(self):
        """The `features.Features` these ask for (files read and checked: UsageError naming the file)."""
        from .documents import load_documents
        from .features import Features
        from .tools import load_tools

        return Features(tools=load_tools(self.tools) if self.tools is not None else None,
                        documents=load_documents(self.documents) if self.documents else None,
                        citations=self.citations, think=self.think, reasoning_budget=self.reasoning_budget)


class Shared(NamedTuple):
    """The shared options as a command body gets them, with the command's context (for flag names)."""

    ctx: typer.Context
    loading: ModelOptions
    sampling: SamplingParams
    extras: FeatureOptions
    system: str | None
    system_file: Path | None
    context_size: int | None
    stats: bool
    color: Color

    def console(self):
        """The rich Console on stderr that --color asks for."""
        from .terminal import stderr_console

        return stderr_console(self.color.value)


SHARED = inspect.signature(_shared, eval_str=True).parameters


def shared_options(command):
    """Give `command` the shared options after its own; its keyword-only `shared` receives them (a Shared).

    A sampling option out of range is reported as Typer reports a bad value: naming the flag, exit status 2.
    """
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "shared"]
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              *own, *SHARED.values()]

    @functools.wraps(command)
    def with_shared(ctx: typer.Context, **values):
        from dataclasses import fields

        from .sample import SamplingParams

        given = {name: values.pop(name) for name in SHARED}
        try:
            sampling = SamplingParams(**{f.name: given.pop(f.name) for f in fields(SamplingParams)})
        except SamplingError as e:
            option = next(p for p in ctx.command.params if p.name == e.param)
            raise typer.BadParameter(f"{e.value} is out of range ({e.rule.format(_flag(option)[2:])})", ctx=ctx,
                                     param=option) from None
        loading = ModelOptions(**{name: given.pop(name) for name in ModelOptions._fields})
        extras = FeatureOptions(**{name: given.pop(name) for name in FeatureOptions._fields})
        return command(**values, shared=Shared(ctx, loading, sampling, extras, **given))

    with_shared.__signature__ = inspect.Signature(params)  # what Typer reads: the options, not **values
    with_shared.__annotations__ = {p.name: p.annotation for p in params}
    return with_shared


def in_flags(ctx: typer.Context, message: str) -> str:
    """A library message in the command's words: a parameter it names in backticks becomes the flag that
    sets it (`context_size` -> --ctx-size); other backticked names stay as they are."""
    flags = {p.name: _flag(p) for p in ctx.command.params if p.param_type_name == "option"}
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def _flag(option) -> str:
    return next((o for o in option.opts if o.startswith("--")), option.opts[0])  # --max-tokens, not -n
