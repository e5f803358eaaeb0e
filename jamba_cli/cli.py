"""The `jamba` command: run, chat, download.

Nothing heavy is imported at module level (torch, the model, huggingface_hub): `jamba --help` and shell
completion stay fast. Each command parses its input and calls the library with keyword arguments.
Exit status: 0 ok, 1 runtime error, 2 usage error, 130 interrupted, 141 stdout closed early.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import CheckpointError, JambaError, UsageError

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
ASK_ABOVE_BYTES = 1_000_000_000  # a TTY confirms before downloading more than this


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


def _in_range(rule: str, ok):
    """An option callback that rejects a value for which `ok` is false, naming `rule`."""
    def check(value):
        if value is not None and not ok(value):
            raise typer.BadParameter(f"{value} is out of range ({rule})")
        return value
    return check


# Options shared by run and chat, declared once.
INT8_SKIP = "mamba,router,lm_head"  # quant.DEFAULT_SKIP, spelled out: importing quant would import torch
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", envvar="JAMBA_MODEL", show_envvar=True,
                                              autocompletion=_complete_model,
                                              help="Checkpoint directory or Hub repo id (default: the bundled model)")]
RevisionOpt = Annotated[str | None, typer.Option(help="Branch, tag or commit of a Hub repo.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Download a missing model without asking.")]
DTypeOpt = Annotated[DType, typer.Option(help="Weight dtype (auto: bf16 on GPU, fp32 on CPU when it fits).")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: cuda if available).")]
KernelsOpt = Annotated[Kernels, typer.Option(help="auto: mamba-ssm, causal-conv1d and Triton kernels on CUDA when "
                                             "installed; torch: plain PyTorch everywhere.")]
DeviceMapOpt = Annotated[str | None, typer.Option(help="Split the model over devices: auto, balanced, "
                                                  "balanced_low_0, sequential, or a JSON file of module -> device.")]
MaxMemOpt = Annotated[str | None, typer.Option(help="Memory per device for the map, e.g. 0=70GiB,1=80GiB,cpu=200GiB.")]
OffloadOpt = Annotated[Path | None, typer.Option(help="Folder for weights that fit nowhere else (memory-mapped).")]
Load8Opt = Annotated[bool, typer.Option("--load-in-8bit", help="Quantize weights to 8 bit (bitsandbytes).")]
Load4Opt = Annotated[bool, typer.Option("--load-in-4bit", help="Quantize weights to 4 bit (bitsandbytes).")]
SkipOpt = Annotated[str, typer.Option(help="Modules left unquantized (comma-separated name parts).")]
ThresholdOpt = Annotated[float, typer.Option(min=0.0, help="LLM.int8 outlier threshold for 8-bit.")]
CtxOpt = Annotated[int | None, typer.Option("--ctx-size", min=1, help="Most tokens the context may hold "
                                            "(default: the model's max_position_embeddings); on a GPU, "
                                            "chat sets its cache aside up front.")]
MaxTokOpt = Annotated[int | None, typer.Option("--max-tokens", "-n", min=0, help="Most tokens to generate "
                                               "(default: generation_config.json, else 512).")]
TempOpt = Annotated[float | None, typer.Option("--temperature", "--temp", min=0.0,
                                               help="0 is greedy (default: generation_config.json, else 0).")]
TopKOpt = Annotated[int | None, typer.Option(min=0, help="Sample from the k most likely tokens (0: off).")]
TopPOpt = Annotated[float | None, typer.Option(callback=_in_range("0 < top-p <= 1", lambda v: 0 < v <= 1),
                                               help="Nucleus sampling: keep tokens up to this probability mass.")]
MinPOpt = Annotated[float | None, typer.Option(callback=_in_range("0 <= min-p < 1", lambda v: 0 <= v < 1),
                                               help="Drop tokens below this fraction of the top probability.")]
PenaltyOpt = Annotated[float | None, typer.Option(callback=_in_range("> 0", lambda v: v > 0),
                                                  help="Penalise tokens already seen (1: off).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling (default: random, shown by --format json).")]
StopOpt = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable); not printed.")]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past end-of-text tokens.")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
SystemFileOpt = Annotated[Path | None, typer.Option("--system-file", help="Read the system prompt from a file.")]
StatsOpt = Annotated[bool, typer.Option("--stats", help="Print load time, speeds and memory on stderr.")]
ColorOpt = Annotated[Color, typer.Option(help="Colour on stderr (auto: on a TTY, unless NO_COLOR is set).")]

app = typer.Typer(name="jamba", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run AI21's Jamba models locally: one-shot generation, chat, and model downloads.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jamba {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    pass


@contextmanager
def _reporting(console):
    """Turn failures into one line on stderr and an exit status (no traceback unless JAMBA_DEBUG=1)."""
    from .terminal import silence_stdout

    try:
        yield
    except JambaError as e:
        console.print(f"[bold red]error:[/] {_escape(e)}", soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(141) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except Exception as e:
        if os.environ.get("JAMBA_DEBUG"):
            raise
        what = "out of memory" if type(e).__name__ == "OutOfMemoryError" else type(e).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        console.print(f"[bold red]error:[/] {what}: {_escape(first)} (JAMBA_DEBUG=1 shows the traceback)",
                      soft_wrap=True)
        raise typer.Exit(1) from None


def _escape(text) -> str:
    from rich.markup import escape

    return escape(str(text))


def bundled_model() -> Path | None:
    """The checkpoint shipped inside the package (jamba_cli/assets/<name>/), if this build has one."""
    assets = Path(__file__).parent / "assets"
    found = sorted(p.parent for p in assets.glob("*/config.json")) if assets.is_dir() else []
    return found[0] if found else None


def _model_dir(console, spec: str | None, revision: str | None, yes: bool) -> tuple[Path, str]:
    """The local checkpoint directory for `spec`, downloading a Hub repo that is not cached yet."""
    if not spec:
        bundled = bundled_model()
        if bundled is None:
            raise UsageError("no model given: pass -m PATH_OR_REPO_ID or set JAMBA_MODEL")
        console.print(f"using the bundled model {bundled.name} (-m or JAMBA_MODEL picks another)",
                      style="dim", highlight=False)
        return bundled, bundled.name
    from .loader import resolve

    path = Path(spec).expanduser()
    if path.is_dir() or not REPO_ID.fullmatch(spec):
        return resolve(path), spec
    from . import hub

    if hub.is_cached(spec, revision):  # the snapshot may hold only the default files: ask hub, not the loader
        return hub.download(spec, revision=revision, offline=True), spec
    return _fetch(console, spec, revision, yes), spec


def _fetch(console, repo: str, revision: str | None, yes: bool) -> Path:
    from . import hub

    hint = f"{repo} is not in the local Hugging Face cache; fetch it with: jamba download {repo}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(hint + " (offline mode is on)")
    if not yes:
        if not (sys.stdin.isatty() and sys.stderr.isatty()):
            raise CheckpointError(hint + " (or pass --yes)")
        from .terminal import format_bytes

        total = sum(size for _, size in hub.plan_download(repo, revision=revision))
        if total > ASK_ABOVE_BYTES and not typer.confirm(f"Download {repo} ({format_bytes(total)})?", err=True):
            raise CheckpointError("not downloaded")
    return hub.download(repo, revision=revision, progress=sys.stderr.isatty())


def load_model(console, spec, *, revision=None, yes=False, dtype=DType.auto, device=None, stats=False,
               kernels=Kernels.auto, **placement):
    """Resolve and load a model, with a progress bar on a TTY. Returns (model, tokenizer, seconds, name).

    `placement`: the loader's device_map, max_memory, offload_folder and quantization options."""
    import time

    if placement["load_in_8bit"] and placement["load_in_4bit"]:
        raise UsageError("--load-in-8bit and --load-in-4bit exclude each other")
    directory, name = _model_dir(console, spec, revision, yes)
    from .loader import load
    from .terminal import load_progress

    start = time.perf_counter()
    with load_progress(console, f"Loading {name}") as progress:
        model, tokenizer = load(directory, dtype=None if dtype == DType.auto else dtype.value, device=device,
                                progress=progress, kernels=kernels.value, **placement)
    load_s = time.perf_counter() - start
    if stats:
        from .quant import footprint
        from .terminal import format_bytes

        where = ", ".join(f"{device} {format_bytes(n)}" for device, n in footprint(model).items())
        console.print(f"weights {where}", style="dim", soft_wrap=True)
    return model, tokenizer, load_s, name


def _read_stdin() -> str:
    stream = getattr(sys.stdin, "buffer", None)
    text = stream.read().decode("utf-8", errors="replace") if stream else sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text


def _read_text(path: Path | str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _read_prompt(words: list[str], files: list[str]) -> str:
    """stdin (when piped and not named by -f -), then the -f files in order, then the arguments."""
    piped = not sys.stdin.isatty()
    parts = [_read_stdin()] if piped and "-" not in files else []
    parts += [_read_stdin() if f == "-" else _read_text(f, "prompt file") for f in files]
    if words:
        parts.append(" ".join(words))
    text = "\n\n".join(p for p in parts if p)
    if not text.strip():
        if not (piped or files or words):
            raise UsageError('no prompt: try  jamba run "Hello"  or  echo Hello | jamba run  (jamba run --help)')
        raise UsageError("the prompt is empty")
    return text


def read_system(system: str | None, system_file: Path | None) -> str | None:
    if system is not None and system_file is not None:
        raise UsageError("--system and --system-file exclude each other")
    return _read_text(system_file, "system file") if system_file is not None else system


@app.command(epilog="Examples:  jamba run -m ai21labs/AI21-Jamba-Mini-1.7 \"Write a haiku\"  ·  "
                    "cat notes.md | jamba run -s \"Be brief\" \"Summarise:\"  ·  "
                    "jamba run --format jsonl -n 64 --stop \"\\n\\n\" \"Once upon a time\"")
def run(
    prompt: Annotated[list[str] | None, typer.Argument(help="Prompt text; piped stdin comes first.")] = None,
    file: Annotated[list[str] | None, typer.Option("--file", "-f", help="Read prompt text from a file "
                                                   "(repeatable; - is stdin).")] = None,
    system: SystemOpt = None, system_file: SystemFileOpt = None,
    model: ModelOpt = None, revision: RevisionOpt = None, yes: YesOpt = False,
    max_tokens: MaxTokOpt = None, temperature: TempOpt = None, top_k: TopKOpt = None, top_p: TopPOpt = None,
    min_p: MinPOpt = None, repetition_penalty: PenaltyOpt = None, seed: SeedOpt = None, stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as plain text, not through the chat "
                                      "template.")] = False,
    dtype: DTypeOpt = DType.auto, device: DeviceOpt = None, kernels: KernelsOpt = Kernels.auto,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemOpt = None, offload_folder: OffloadOpt = None, load_in_8bit: Load8Opt = False,
    load_in_4bit: Load4Opt = False, int8_skip: SkipOpt = INT8_SKIP, int8_threshold: ThresholdOpt = 6.0,
    ctx_size: CtxOpt = None,
    prompt_cache: Annotated[Path | None, typer.Option("--prompt-cache", help="Reuse (and save) the model state "
                                                      "of a prompt that starts the same way.")] = None,
    format: Annotated[Format, typer.Option("--format", help="text, json (one object) or jsonl (an event per "
                                           "chunk, then a summary).")] = Format.text,
    stats: StatsOpt = False, color: ColorOpt = Color.auto,
) -> None:
    """Generate a continuation of PROMPT and print only the generated text on stdout."""
    from .terminal import stderr_console

    console = stderr_console(color.value)
    with _reporting(console):
        text = _read_prompt(prompt or [], file or [])
        system_text = read_system(system, system_file)
        if raw and system_text is not None:
            raise UsageError("--system needs the chat template; drop --raw")
        loaded = load_model(console, model, revision=revision, yes=yes, dtype=dtype, device=device, stats=stats,
                            kernels=kernels,
                            device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                            load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, int8_skip=int8_skip,
                            int8_threshold=int8_threshold)
        _generate(console, *loaded, text, system_text, raw=raw, format=format, stats=stats, ctx_size=ctx_size,
                  prompt_cache=prompt_cache, seed=seed,
                  options=dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               min_p=min_p, repetition_penalty=repetition_penalty, stop=stop or (),
                               ignore_eos=ignore_eos))


def _generate(console, model, tokenizer, load_s, name, text, system_text, *, raw, format, stats, ctx_size,
              prompt_cache, seed, options) -> None:
    import random

    from .generation import stream_generate
    from .terminal import Interrupt, stats_line

    if raw or not tokenizer.has_chat_format:
        if system_text is not None:
            raise UsageError("this model has no chat template, so --system cannot be used")
        prompt = text
    else:
        prompt = ([{"role": "system", "content": system_text}] if system_text is not None else []) + \
                 [{"role": "user", "content": text}]
    seed = seed if seed is not None else random.randrange(2**31)
    out = sys.stdout
    pieces, last = [], None
    with Interrupt() as interrupt:
        try:
            for chunk in stream_generate(model, tokenizer, prompt, seed=seed, context_size=ctx_size,
                                         prompt_cache=prompt_cache, should_stop=lambda: interrupt.requested,
                                         **options):
                last = chunk
                pieces.append(chunk.text)
                if format == Format.text and chunk.text:
                    out.write(chunk.text)
                    out.flush()
                elif format == Format.jsonl:
                    out.write(json.dumps({"type": "chunk", "text": chunk.text, "token": chunk.token},
                                         ensure_ascii=False) + "\n")
                    out.flush()
        except KeyboardInterrupt:
            if format == Format.text and pieces:
                out.write("\n")
                out.flush()
            raise
    reply = "".join(pieces)
    s = last.stats
    summary = {"finish_reason": last.finish_reason, "model": name, "seed": seed,
               "usage": {"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                         "completion_tokens": s.generation_tokens},
               "timings": {"load_s": round(load_s, 4), "ttft_s": round(s.ttft_s, 4),
                           "prompt_tps": round(s.prompt_tps, 2), "generation_tps": round(s.generation_tps, 2),
                           "peak_memory_bytes": s.peak_memory_bytes}}
    if format == Format.text:
        out.write("" if reply.endswith("\n") else "\n")
    elif format == Format.json:
        out.write(json.dumps({"text": reply, **summary}, ensure_ascii=False) + "\n")
    else:
        out.write(json.dumps({"type": "done", **summary}, ensure_ascii=False) + "\n")
    out.flush()
    if stats:
        console.print(stats_line(s, last.finish_reason, load_s, model.device.type), style="dim", soft_wrap=True)
    if last.finish_reason == "interrupted":
        raise typer.Exit(130)


@app.command(epilog="Examples:  jamba chat -m ai21labs/AI21-Jamba-Mini-1.7  ·  "
                    "printf 'Hi\\n/bye\\n' | jamba chat  ·  jamba chat --resume talk.json")
def chat(
    model: ModelOpt = None, revision: RevisionOpt = None, yes: YesOpt = False,
    system: SystemOpt = None, system_file: SystemFileOpt = None,
    max_tokens: MaxTokOpt = None, temperature: TempOpt = None, top_k: TopKOpt = None, top_p: TopPOpt = None,
    min_p: MinPOpt = None, repetition_penalty: PenaltyOpt = None, seed: SeedOpt = None, stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    dtype: DTypeOpt = DType.auto, device: DeviceOpt = None, kernels: KernelsOpt = Kernels.auto,
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemOpt = None, offload_folder: OffloadOpt = None, load_in_8bit: Load8Opt = False,
    load_in_4bit: Load4Opt = False, int8_skip: SkipOpt = INT8_SKIP, int8_threshold: ThresholdOpt = 6.0,
    ctx_size: CtxOpt = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue a conversation saved with /save.")] = None,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not read or write the input history "
                                             "file (also: JAMBA_NOHISTORY=1).")] = False,
    stats: StatsOpt = False, color: ColorOpt = Color.auto,
) -> None:
    """Talk with the model. /help lists the commands; /bye or Ctrl+D ends.

    With stdin not a TTY, each line (or \"\"\" block) is a message and only the replies are printed."""
    from .terminal import stderr_console

    console = stderr_console(color.value)
    with _reporting(console):
        system_text = read_system(system, system_file)
        model_, tokenizer, load_s, name = load_model(
            console, model, revision=revision, yes=yes, dtype=dtype, device=device, stats=stats, kernels=kernels,
            device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, load_in_8bit=load_in_8bit,
            load_in_4bit=load_in_4bit, int8_skip=int8_skip, int8_threshold=int8_threshold)
        from .chat import ChatSession, ChatSettings, repl

        settings = ChatSettings(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []),
                                ignore_eos=ignore_eos, stats=stats)
        session = ChatSession(model_, tokenizer, name=name, system=system_text, settings=settings,
                              context_size=ctx_size)
        if resume is not None:
            session.load(resume, console)
        history = not (no_history or os.environ.get("JAMBA_NOHISTORY"))
        raise typer.Exit(repl(session, console, history=history, load_s=load_s))


@app.command(epilog="Examples:  jamba download ai21labs/AI21-Jamba-Mini-1.7  ·  "
                    "jamba download ai21labs/AI21-Jamba-Mini-1.7 config.json --local-dir ./jamba  ·  "
                    "jamba download ai21labs/AI21-Jamba-Mini-1.7 --dry-run")
def download(
    repo: Annotated[str, typer.Argument(help="Hub repo id, e.g. ai21labs/AI21-Jamba-Mini-1.7.")],
    files: Annotated[list[str] | None, typer.Argument(help="Only these files.")] = None,
    revision: RevisionOpt = None,
    include: Annotated[list[str] | None, typer.Option(help="Glob of files to get (repeatable) (default: "
                                                      "safetensors, json, tokenizer and chat template files).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob of files to skip (repeatable).")] = None,
    local_dir: Annotated[Path | None, typer.Option(help="Put the files in this directory, not the cache.")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Hugging Face cache to use (default: HF_HUB_CACHE).")] = None,
    token: Annotated[str | None, typer.Option(help="Hub access token (default: HF_TOKEN or the saved login).",
                                              show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and bytes to fetch; fetch none.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Use only what is cached; no network.")] = False,
    color: ColorOpt = Color.auto,
) -> None:
    """Download a model from the Hugging Face Hub and print its local path on stdout."""
    from .terminal import format_bytes, stderr_console

    console = stderr_console(color.value)
    with _reporting(console):
        from . import hub

        kwargs = dict(revision=revision, include=include, exclude=exclude, local_dir=local_dir,
                      cache_dir=cache_dir, token=token)
        if dry_run:
            if offline:
                raise UsageError("--dry-run asks the Hub what to fetch; it cannot be --offline")
            plan = hub.plan_download(repo, files or None, **kwargs)
            for name, size in plan:
                typer.echo(f"{size:>14,}  {name}")
            typer.echo(f"{sum(s for _, s in plan):>14,}  total ({len(plan)} files, "
                       f"{format_bytes(sum(s for _, s in plan))})")
            return
        path = hub.download(repo, files or None, offline=offline, progress=sys.stderr.isatty(), **kwargs)
        typer.echo(str(path))


def main() -> None:
    """Console entry point: usage errors become one line and exit status 2."""
    try:
        code = app(prog_name="jamba", standalone_mode=False)
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
        else:
            ctx = getattr(e, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {e.format_message()}{where}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
