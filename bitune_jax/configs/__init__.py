"""The shipped configs: `get_config(arg)` per method (`bitune-train --config
configs/<method>.py:ARG` finds them from any directory)."""
