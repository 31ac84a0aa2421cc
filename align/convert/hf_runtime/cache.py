"""KV caches are for generation; align compares full forward and backward passes. The
names exist so that converted files import; building a cache fails loudly."""


class Cache:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("KV caches are not supported by align's runtime (set use_cache = false)")


class DynamicCache(Cache):
    pass
