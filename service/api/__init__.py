"""Everything HTTP: ``app`` (the app factory), ``routes`` (one module per front end), ``protocol``
(their request/response bodies), ``deps`` (FastAPI dependencies), ``body`` (body checks before
parsing), ``errors`` (how an error becomes a response), ``limits`` and ``middleware``."""
