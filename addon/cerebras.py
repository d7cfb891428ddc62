"""The script mitmproxy loads: `mitmdump -s addon/cerebras.py`.

mitmproxy puts this file's folder on sys.path, so the `cooldown` package beside it imports
even without installing the project. Script reload re-runs only this file; all state lives on
the addon objects, never in module globals.
"""

from cooldown.addon import Cooldown

addons = Cooldown().addons
