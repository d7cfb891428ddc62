"""Where the limiter's state lives beyond this process: Redis, shared by several proxies."""
