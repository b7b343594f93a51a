"""Who may send, and how much: tokens and their scopes, client addresses behind trusted proxies, rate limits, and deadlines for slow clients."""
