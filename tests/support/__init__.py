"""What the tests share: a real server, WebSocket client helpers, a real redis-server and Redis
Cluster, apps."""
