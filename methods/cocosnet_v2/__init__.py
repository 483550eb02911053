from methods.cocosnet_v2.model import CoCosNetV2Method  # noqa: F401  (registers "cocosnet_v2")
