from methods.spade.model import SPADEMethod  # noqa: F401  (registers "spade")
