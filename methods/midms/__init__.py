from methods.midms.model import MIDMsMethod  # noqa: F401  (registers "midms")
