"""Search back-ends for the agent's tool calls: the clients (Serper, Bing, a local retriever, a
mock; clients.py), their on-disk cache (cache.py) and the embedded BM25 retriever server
(server.py, `python -m igpo_jax.search.server`). Imports no other igpo_jax package.
"""
