from methods.cocosnet.model import CoCosNetMethod  # noqa: F401  (registers "cocosnet")
