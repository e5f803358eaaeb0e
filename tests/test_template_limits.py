"""A checkpoint's chat template is untrusted: it renders in Jinja's sandbox, and a render that runs too long
or writes too much is stopped with one ChatTemplateError, whatever the loop looks like."""

import time

import pytest

from jamba_cli import tokenizer as T
from jamba_cli.errors import ChatTemplateError

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source", [
    "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",  # prints
    "{% for a in range(100000) %}{% for b in range(100000) %}{% set x = b %}{% endfor %}{% endfor %}",  # calls
    # neither prints nor calls inside the loops: only the interval timer reaches it
    "{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% for c in r %}{% endfor %}{% endfor %}{% endfor %}",
])
def test_a_template_that_runs_too_long_is_stopped(monkeypatch, source):
    monkeypatch.setattr(T, "TEMPLATE_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="took more than"):
        T._render_bounded(T._compile(source), messages=MESSAGES)
    assert time.monotonic() - start < 5


def test_a_template_that_writes_too_much_is_stopped(monkeypatch):
    monkeypatch.setattr(T, "TEMPLATE_MAX_CHARS", 1 << 20)
    source = "{% for a in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="passed"):
        T._render_bounded(T._compile(source), messages=MESSAGES)


def test_a_normal_template_renders_and_leaves_no_timer_behind():
    import signal

    before = signal.getsignal(signal.SIGALRM)
    assert T._render_bounded(T._compile("{% for m in messages %}{{ m.content }}{% endfor %}"), messages=MESSAGES) == "hi"
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
