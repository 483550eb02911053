from datasets.registry import Registry

METHODS: Registry = Registry("method")
