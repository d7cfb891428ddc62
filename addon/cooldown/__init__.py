"""Cooldown: hold Cerebras API requests inside mitmproxy until they fit the rate limits."""

__version__ = "0.1.0"
