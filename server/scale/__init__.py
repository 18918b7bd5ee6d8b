"""Scale-out on Ray Serve (server/serve_ray.py assembles it): which replica a prompt goes to
(affinity, router), splitting and joining multi-prompt requests (fanout), and running a forwarded
request through a replica's app (asgi_call)."""
