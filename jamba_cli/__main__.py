"""`python -m jamba_cli`, and the `jamba` command's entry point (pyproject's [project.scripts]).

Before anything else is imported (Typer, and later torch, take most of a second to import): Ctrl+C
leaves at once with status 130, and the standard streams are made safe (terminal.start_process)."""


def main() -> None:
    from .terminal import start_process

    start_process()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
