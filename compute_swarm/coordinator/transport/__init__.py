"""How the coordinator is reached: the REST and OpenAI-compatible API, the web pages, and the hub (the
nodes' websockets, dispatch and the lease sweeper), which carries out the services' effects."""
