"""Everything HTTP: ``app`` (the app factory), ``routes`` (one module per front end), ``protocol``
(their request/response bodies), ``deps`` (FastAPI dependencies), ``body`` (body checks before
parsing), ``errors`` (how an error becomes a response), ``openapi`` (settings'
limits in the OpenAPI document, ``Allow`` lists), ``limits``, ``access`` (keys, rate limits,
cross-site checks), ``connections`` (slow clients), ``middleware`` (request metrics), ``shutdown``
(SIGTERM drain) and ``static`` (the keyboard page). ``docs/service.md`` has the map."""
