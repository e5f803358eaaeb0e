"""The `jamba` command: run, chat, serve, download.

Nothing heavy is imported at module level (torch, the model, huggingface_hub): `jamba --help` and shell
completion stay fast. Each command parses its input and calls the library with keyword arguments; the
options `run` and `chat` share are declared once, in cli_options.py.
Exit status: 0 ok, 1 runtime error, 2 usage error, 130 interrupted, 141 stdout closed early.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .cli_options import Color, ColorOpt, Format, ModelOptions, RevisionOpt, Shared, in_flags, shared_options
from .defaults import bundled_model_dir
from .errors import ChatTemplateError, CheckpointError, ContextOverflowError, JambaError, UsageError

ASK_ABOVE_BYTES = 1_000_000_000  # a TTY confirms before downloading more than this

app = typer.Typer(name="jamba", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Run AI21's Jamba models locally: one-shot generation, chat, an OpenAI-compatible "
                       "server, and model downloads.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jamba {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Show the version and exit.")] = False) -> None:
    pass


@contextmanager
def _reporting(console, ctx: typer.Context):
    """Turn failures into one line on stderr and an exit status (no traceback unless JAMBA_DEBUG=1)."""
    from . import terminal
    from .terminal import plain, silence_stdout

    try:
        yield
    except JambaError as e:  # a message may quote a file (a tensor name, a path): plain() makes it inert
        console.print(plain("error:", "bold red") + " " + plain(in_flags(ctx, str(e))), soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except BrokenPipeError:
        silence_stdout()
        raise typer.Exit(141) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except Exception as e:
        if isinstance(e, OSError) and terminal.stdout_error is not None:  # /dev/full, a closed descriptor
            silence_stdout()
            console.print(plain("error:", "bold red") + " " + plain(f"cannot write the output: {e.strerror or e}"),
                          soft_wrap=True)
            raise typer.Exit(1) from None
        if os.environ.get("JAMBA_DEBUG"):
            raise
        what = "out of memory" if type(e).__name__ == "OutOfMemoryError" else type(e).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        message = f"{what}: {first} (JAMBA_DEBUG=1 shows the traceback)"
        console.print(plain("error:", "bold red") + " " + plain(message), soft_wrap=True)
        raise typer.Exit(1) from None


def _model_dir(console, spec: str | None, revision: str | None, yes: bool) -> tuple[Path, str]:
    """The local checkpoint directory for `spec`, downloading a Hub repo that is not cached yet."""
    if not spec:
        bundled = bundled_model_dir()
        if bundled is None:
            raise UsageError("no model given: pass -m PATH_OR_REPO_ID or set JAMBA_MODEL")
        console.print(f"using the bundled model {bundled.name} (-m or JAMBA_MODEL picks another)",
                      style="dim", highlight=False)
        return bundled, bundled.name
    from . import hub
    from .files import expand_user
    from .loader import resolve

    path, local = expand_user(spec, "model"), hub.is_local_path(spec)
    if path.is_dir() or (local and os.path.lexists(path)):  # a file: the loader says what is wrong
        return resolve(path), spec
    if local:  # a path is never taken for a repo id, so it is never downloaded
        why = ""
        if hub.REPO_ID.fullmatch(spec):
            why = f" ({spec.split('/')[0]}/ is a local folder, so this is a path, not a Hub repo id)"
        raise CheckpointError(f"no such checkpoint directory: {spec}{why}")
    hub.check_revision(revision)
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


def load_model(console, options: ModelOptions, *, stats: bool = False):
    """Resolve and load a model, with a progress bar on a TTY. Returns (model, tokenizer, seconds, name)."""
    import time

    from . import generation  # noqa: F401  (imported here, where an early Ctrl+C still leaves at once)
    from .loader import load, quant_config
    from .terminal import load_progress, raise_on_interrupt

    raise_on_interrupt()  # from here a download or a load may have to clean up after itself
    # contradictory quantization options fail here, before a model is downloaded
    arguments = options.load_arguments()
    quant_config(options.load_in_8bit, options.load_in_4bit, options.int8_skip, options.int8_threshold,
                 arguments["quant"], arguments["int8_backend"])
    directory, name = _model_dir(console, options.model, options.revision, options.yes)
    start = time.perf_counter()
    with load_progress(console, f"Loading {name}") as progress:
        model, tokenizer = load(directory, progress=progress, **arguments)
    load_s = time.perf_counter() - start
    if stats:
        from .quant import bytes_by_dtype, footprint
        from .terminal import format_bytes

        where = ", ".join(f"{device} {format_bytes(n)}" for device, n in footprint(model).items())
        kinds = ", ".join(f"{dtype} {format_bytes(n)}" for dtype, n in bytes_by_dtype(model).items())
        console.print(f"weights {where} ({kinds})", style="dim", soft_wrap=True)
    return model, tokenizer, load_s, name


# The most text one source of a prompt (stdin, a file) may hold: far more than the largest context takes
# (256K tokens are about 1 MB of text), so that `yes | jamba run` or `-f /dev/zero` ends instead of filling
# memory. Tokenizing stops at the context's size anyway (Tokenizer.encode's `limit`).
MAX_PROMPT_BYTES = 64 * 2**20


def _read_stdin(*, named: bool) -> str:
    """Piped stdin as text. When it cannot be read (a descriptor open for writing only, an I/O error), the
    prompt goes on without it, with a note; `named` (-f -) makes that an error instead."""
    try:
        stream = getattr(sys.stdin, "buffer", None)
        text = _decode(stream.read(MAX_PROMPT_BYTES + 1), "stdin") if stream else sys.stdin.read()
    except OSError as e:
        if named:
            raise UsageError(f"cannot read stdin (-f -): {e.strerror or e}") from None
        print(f"note: stdin cannot be read ({e.strerror or e}); the prompt is made without it", file=sys.stderr)
        return ""
    return text[:-1] if text.endswith("\n") else text


def _read_text(path: Path | str, what: str, param: str) -> str:
    from .files import expand_user

    path = expand_user(path, param)  # `~user` of no such user: a usage error naming the flag
    try:
        with open(path, "rb") as f:
            return _decode(f.read(MAX_PROMPT_BYTES + 1), f"{what} {path}")
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _decode(data: bytes, what: str) -> str:
    if len(data) > MAX_PROMPT_BYTES:
        raise ContextOverflowError(f"{what} holds more than {MAX_PROMPT_BYTES // 2**20} MiB, the most a prompt "
                                   "may hold")
    return data.decode("utf-8", errors="replace")


def _checked_text(value: str | None, what: str) -> str | None:
    """Text from the command line, which must be UTF-8: Python keeps other bytes as lone surrogates
    (surrogateescape), which the tokenizer cannot take. Paths may hold any bytes and are not checked."""
    if value is not None and any("\udc80" <= c <= "\udcff" for c in value):
        raw = value.encode("utf-8", errors="surrogateescape")
        raise UsageError(f"{what} is not valid UTF-8: {raw!r}")
    return value


def _read_prompt(words: list[str], files: list[str]) -> tuple[str, list[str]]:
    """stdin (when piped and not named by -f -), then the -f files in order, then the arguments; returns the
    prompt and the non-empty parts it joins (a prompt cache keeps the model state at the end of each)."""
    piped = not sys.stdin.isatty()
    parts = [_read_stdin(named=False)] if piped and "-" not in files else []
    parts += [_read_stdin(named=True) if f == "-" else _read_text(f, "prompt file", "file") for f in files]
    if words:
        parts.append(" ".join(words))
    text = "\n\n".join(p for p in parts if p)
    if not text.strip():
        if not (piped or files or words):
            raise UsageError('no prompt: try  jamba run "Hello"  or  echo Hello | jamba run  (jamba run --help)')
        raise UsageError("the prompt is empty")
    return text, [p for p in parts if p]


def _require_stdout() -> None:
    if sys.stdout is None:  # started with descriptor 1 closed (terminal.guard_streams)
        raise JambaError("stdout is closed: there is nowhere to write the output")


def _checked(shared: Shared) -> Shared:
    """The shared options with their text checked (UTF-8) and `~` expanded in the loader's paths (the
    system file's is expanded where it is read); `~user` of no such user is a usage error."""
    from .files import expand_user

    _checked_text(shared.system, "--system")
    for stop in shared.sampling.stop or ():
        _checked_text(stop, "--stop")
    loading = shared.loading
    if loading.offload_folder is not None:
        loading = loading._replace(offload_folder=expand_user(loading.offload_folder, "offload_folder"))
    if loading.device_map is not None and loading.device_map.startswith("~"):  # a file, not a keyword
        loading = loading._replace(device_map=str(expand_user(loading.device_map, "device_map")))
    return shared._replace(loading=loading)


def read_system(system: str | None, system_file: Path | None) -> str | None:
    if system is not None and system_file is not None:
        raise UsageError("--system and --system-file exclude each other")
    return _read_text(system_file, "system file", "system_file") if system_file is not None else system


@app.command(epilog="Examples:  jamba run -m ai21labs/AI21-Jamba-Mini-1.7 \"Write a haiku\"  ·  "
                    "cat notes.md | jamba run -s \"Be brief\" \"Summarise:\"  ·  "
                    "jamba run --format jsonl -n 64 --stop \"\\n\\n\" \"Once upon a time\"")
@shared_options
def run(
    prompt: Annotated[list[str] | None, typer.Argument(help="Prompt text; piped stdin comes first.")] = None,
    file: Annotated[list[str] | None, typer.Option("--file", "-f", help="Read prompt text from a file "
                                                   "(repeatable; - is stdin).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as plain text, not through the chat "
                                      "template.")] = False,
    prompt_cache: Annotated[Path | None, typer.Option("--prompt-cache", help="Reuse (and save) the model state "
                                                      "of a prompt that starts the same way.")] = None,
    format: Annotated[Format, typer.Option("--format", help="text, json (one object) or jsonl (an event per "
                                           "chunk, then a summary).")] = Format.text,
    *, shared: Shared,
) -> None:
    """Generate a continuation of PROMPT and print only the generated text on stdout."""
    console = shared.console()
    with _reporting(console, shared.ctx):
        _require_stdout()
        for word in prompt or []:
            _checked_text(word, "the prompt")
        shared = _checked(shared)
        text, parts = _read_prompt(prompt or [], file or [])
        system_text = read_system(shared.system, shared.system_file)
        if raw and system_text is not None:
            raise UsageError("--system needs the chat template; drop --raw")
        features = shared.extras.features()  # the files are read and checked before the model loads
        if raw and features.any:
            raise UsageError("--tools, --doc, --citations, --think and --reasoning-budget need the chat template; "
                             "drop --raw")
        if features.citations and not features.documents:
            raise UsageError("--citations needs documents to cite: --doc FILE")
        if prompt_cache is not None:  # a directory, link, pipe or foreign file is refused before any work
            from .files import expand_user
            from .prompt_cache import check_target

            prompt_cache = check_target(expand_user(prompt_cache, "prompt_cache"))
        loaded = load_model(console, shared.loading, stats=shared.stats)
        _generate(console, *loaded, text, system_text, raw=raw, format=format, shared=shared,
                  prompt_cache=prompt_cache, parts=parts, features=features)


def _generate(console, model, tokenizer, load_s, name, text, system_text, *, raw, format, shared: Shared,
              prompt_cache, parts=(), features=None) -> None:
    import random

    from .features import Features, ReplyReader
    from .generation import stream_generate
    from .reasoning import prompt_opens_thinking, template_thinks
    from .reply_view import ReplyView
    from .terminal import Interrupt, plain, stats_line

    features = features or Features()
    if raw or not tokenizer.has_chat_format:
        if system_text is not None:
            raise UsageError("this model has no chat template, so --system cannot be used")
        if features.any:
            features.check(tokenizer)  # one line naming what needs a template
        prompt, kwargs, reader = text, {}, None
    else:
        features.check(tokenizer)
        prompt = ([{"role": "system", "content": system_text}] if system_text is not None else []) + \
                 [{"role": "user", "content": text}]
        kwargs = features.template_kwargs(tokenizer)
        thinking = template_thinks(tokenizer.chat_template) and prompt_opens_thinking(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **kwargs))
        reader = ReplyReader(features, thinking)
    processors = features.logits_processors(tokenizer, reader.splitter.thinking) if reader is not None else []
    documents = [d["text"] for d in features.documents or []]
    seed = shared.sampling.seed if shared.sampling.seed is not None else random.randrange(2**31)
    out = sys.stdout
    # on a terminal the model's text is shown inert: byte-fallback tokens can spell escape sequences (a window
    # title, a clipboard write, a cursor move that hides text); a pipe or a file gets the bytes as they are
    view = ReplyView(console, show_thinking=shared.extras.show_thinking, out=out)
    texts, last, result = [], None, None
    with Interrupt() as interrupt:
        try:
            for chunk in stream_generate(model, tokenizer, prompt, shared.sampling.override(seed=seed),
                                         context_size=shared.context_size, prompt_cache=prompt_cache,
                                         prompt_parts=[p for p in (system_text, *documents, *parts) if p],
                                         should_stop=lambda: interrupt.requested, template_kwargs=kwargs,
                                         logits_processors=processors, special=shared.extras.special):
                last = chunk
                texts.append(chunk.text)
                pieces = [("content", chunk.text)] if reader is None else reader.feed(chunk.text)
                if chunk.finish_reason is not None and reader is not None:
                    more, result = reader.finish()
                    pieces += more
                if format == Format.text:
                    view.pieces(pieces)
                elif format == Format.jsonl:
                    for kind, piece in pieces or [("content", "")]:
                        record = {"type": "chunk" if kind == "content" else kind, "text": piece, "token": chunk.token}
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
        except KeyboardInterrupt:
            if format == Format.text and texts:
                out.write("\n")
                out.flush()
            raise
    reply = "".join(texts) if result is None else result.content
    extra = {} if result is None else result.fields()
    s = last.stats
    summary = {"finish_reason": last.finish_reason, "model": name, "seed": seed,
               "usage": {"prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens,
                         "completion_tokens": s.generation_tokens},
               "timings": {"load_s": round(load_s, 4), "ttft_s": round(s.ttft_s, 4),
                           "prompt_tps": round(s.prompt_tps, 2), "generation_tps": round(s.generation_tps, 2),
                           "peak_memory_bytes": s.peak_memory_bytes}}
    if format == Format.text:
        view.finish(result)
    elif format == Format.json:
        out.write(json.dumps({"text": reply, **extra, **summary}, ensure_ascii=False) + "\n")
    else:
        for call in extra.pop("tool_calls", []):
            out.write(json.dumps(call, ensure_ascii=False) + "\n")
        extra.pop("reasoning", None)  # streamed already, as reasoning records
        out.write(json.dumps({"type": "done", **extra, **summary}, ensure_ascii=False) + "\n")
    if result is not None and format != Format.text:
        for note in result.notes:
            console.print(plain(f"note: {note}", "yellow"), soft_wrap=True)
    out.flush()
    if shared.stats:
        console.print(stats_line(s, last.finish_reason, load_s, model.device.type), style="dim", soft_wrap=True)
    if last.finish_reason == "interrupted":
        raise typer.Exit(130)


@app.command(epilog="Examples:  jamba chat -m ai21labs/AI21-Jamba-Mini-1.7  ·  "
                    "printf 'Hi\\n/bye\\n' | jamba chat  ·  jamba chat --resume talk.json")
@shared_options
def chat(
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue a conversation saved with /save.")] = None,
    no_history: Annotated[bool, typer.Option("--no-history", help="Do not read or write the input history "
                                             "file (also: JAMBA_NOHISTORY=1).")] = False,
    *, shared: Shared,
) -> None:
    """Talk with the model. /help lists the commands; /bye or Ctrl+D ends.

    With stdin not a TTY, each line (or \"\"\" block) is a message and only the replies are printed."""
    console = shared.console()
    translate = partial(in_flags, shared.ctx)
    with _reporting(console, shared.ctx):
        _require_stdout()
        shared = _checked(shared)
        if resume is not None:
            from .files import expand_user

            resume = expand_user(resume, "resume")
        system_text = read_system(shared.system, shared.system_file)
        features = shared.extras.features()  # the files are read and checked before the model loads
        if features.citations and not features.documents:
            raise UsageError("--citations needs documents to cite: --doc FILE")
        model, tokenizer, _, name = load_model(console, shared.loading, stats=shared.stats)
        from .chat import ChatSession
        from .repl import repl

        try:
            session = ChatSession(model, tokenizer, name=name, system=system_text, sampling=shared.sampling,
                                  context_size=shared.context_size, features=features,
                                  special=shared.extras.special)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{e}; use: jamba run --raw") from None
        session.stats = shared.stats
        if resume is not None:
            from .terminal import plain

            for note in session.load(resume):
                console.print(plain(f"note: {translate(note)}", "yellow"), soft_wrap=True)
        history = not (no_history or os.environ.get("JAMBA_NOHISTORY"))
        raise typer.Exit(repl(session, console, history=history, translate=translate,
                              show_thinking=shared.extras.show_thinking))


@app.command(epilog="Examples:  jamba serve -m ai21labs/AI21-Jamba-Mini-1.7  ·  "
                    "JAMBA_API_KEY=secret jamba serve --host 0.0.0.0 --port 8000  ·  "
                    "jamba serve --cors http://localhost:3000 --temperature 0.7")
@shared_options
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface; then set "
                                      "--api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one, shown on "
                                      "start).")] = 8080,
    api_key: Annotated[str | None, typer.Option(envvar="JAMBA_API_KEY", show_envvar=True, show_default=False,
                                                help="Require Authorization: Bearer KEY on every route but "
                                                "/health.")] = None,
    cors: Annotated[list[str] | None, typer.Option("--cors", help="Let web pages from this origin call the "
                                                   "server (repeatable; * for any).")] = None,
    queue_size: Annotated[int, typer.Option(min=0, help="Requests that may wait while one is generated; more "
                                            "get 429.")] = 16,
    cache_budget: Annotated[str, typer.Option(help="Memory for the prefix cache's saved states, e.g. 4GiB "
                                              "(0: off).")] = "4GiB",
    max_body_size: Annotated[str, typer.Option(help="Largest request body; a larger one gets 413.")] = "16MiB",
    *, shared: Shared,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models.

    The sampling flags are the defaults of requests that leave a field out; --system is the system prompt of
    chats that send none. Ctrl+C or SIGTERM stops it (exit status 0)."""
    console = shared.console()
    with _reporting(console, shared.ctx):
        shared = _checked(shared)
        try:
            from . import server
        except ModuleNotFoundError as e:
            from .errors import DependencyError

            raise DependencyError(f"jamba serve needs {e.name}: pip install 'jamba-cli[serve]'") from None
        from .terminal import plain

        extras = shared.extras
        if any((extras.tools, extras.documents, extras.citations, extras.show_thinking, extras.think is not None,
                extras.reasoning_budget is not None, extras.special)):
            raise UsageError("--tools, --doc, --citations, --think, --reasoning-budget, --show-thinking and --special "
                             "are for run and chat; serve takes tools and documents in each request")
        budget = server.parse_size(cache_budget, "cache_budget")
        body_limit = server.parse_size(max_body_size, "max_body_size")
        system_text = read_system(shared.system, shared.system_file)
        for origin in cors or ():
            _checked_text(origin, "--cors")
        if not api_key and not server.is_loopback(host):
            console.print(plain(f"warning: --host {host} lets anyone who reaches this port use the model; "
                                "set --api-key (or JAMBA_API_KEY)", "yellow"), soft_wrap=True)
        sock = server.listen(host, port)  # a port in use fails now, not after loading
        model, tokenizer, load_s, name = load_model(console, shared.loading, stats=shared.stats)
        served = Path(name).name if os.path.isdir(os.path.expanduser(name)) else name  # a path: its folder's name
        on_done = None
        if shared.stats:
            from .terminal import stats_line

            def on_done(chunk):
                console.print(stats_line(chunk.stats, chunk.finish_reason, None, model.device.type), style="dim",
                              soft_wrap=True)
        app_ = server.create_app(model, tokenizer, name=served, aliases=[name] if name != served else [],
                                 context_size=shared.context_size, cache_budget=budget, api_key=api_key,
                                 cors=cors or [], queue_size=queue_size, max_body_size=body_limit,
                                 sampling=shared.sampling, system=system_text, on_done=on_done)
        if shared.stats:
            console.print(f"load {load_s:.2f} s", style="dim", soft_wrap=True)
        server.serve(app_, sock, ready=lambda: console.print(plain(f"serving {served} on {server.url(sock)}"),
                                                             soft_wrap=True, highlight=False))


@app.command(epilog="Examples:  jamba download ai21labs/AI21-Jamba-Mini-1.7  ·  "
                    "jamba download ai21labs/AI21-Jamba-Mini-1.7 config.json --local-dir ./jamba  ·  "
                    "jamba download ai21labs/AI21-Jamba-Mini-1.7 --dry-run")
def download(
    ctx: typer.Context,
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
    with _reporting(console, ctx):
        from . import hub
        from .terminal import raise_on_interrupt

        raise_on_interrupt()  # huggingface_hub is imported: from here Ctrl+C unwinds

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
    """Console entry point: usage errors become one line and exit status 2; output that cannot be written
    (--help into /dev/full, a completion script into a read-only home) one line and status 1, or 141 when
    the reader of stdout went away."""
    from . import terminal

    terminal.start_process()  # done already when started as `python -m jamba_cli` or `jamba`
    try:
        code = app(prog_name="jamba", standalone_mode=False)
    except OSError as e:  # outside the commands' own reporting: --help, --version, --install-completion
        if terminal.stdout_closed_early():
            terminal.silence_stdout()
            sys.exit(141)
        if terminal.stdout_error is not None:
            terminal.silence_stdout()  # what stays in the buffer must not fail again at exit
            print(f"error: cannot write the output: {e.strerror or e}", file=sys.stderr)
        else:
            where = f" {e.filename}" if e.filename else ""
            # mkdir(exist_ok=True) of a path that is a file says "File exists"
            reason = os.strerror(errno.ENOTDIR) if e.errno == errno.EEXIST else e.strerror or e
            print(terminal.printable(f"error: cannot write{where}: {reason}"), file=sys.stderr)
        sys.exit(1)
    except SystemExit:
        if terminal.stdout_closed_early():  # Typer's own exit for a closed pipe is status 1
            terminal.silence_stdout()
            sys.exit(141)
        raise
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

