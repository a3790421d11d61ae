"""The files shipped with the trainer: presets (``NAME.yaml``) and small prompt sets, found by name.

Both the config (presets) and the prompt loaders (a source may name a shipped file) look files up here, so this
module, not either of them, owns the folder.
"""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent


def resolve_prompt_path(source: str) -> Path | None:
    """A path as given, else a file of that name shipped here; None if neither exists."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    shipped = PRESET_DIR / source
    return shipped if shipped.is_file() else None
