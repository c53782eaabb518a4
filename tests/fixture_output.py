"""Read a recorded command output (``tests/fixtures/<scheduler>/NAME.{stdout,stderr,rc}``)."""

from pathlib import Path

from hub_spawner.schedulers import CommandOutput

FIXTURES = Path(__file__).parent / "fixtures"


def recorded(scheduler: str, name: str) -> CommandOutput:
    base = FIXTURES / scheduler / name
    return CommandOutput(
        int(Path(f"{base}.rc").read_text()),
        Path(f"{base}.stdout").read_text(),
        Path(f"{base}.stderr").read_text(),
    )
