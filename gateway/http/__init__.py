"""The byte-level side of the gateway, apart from what it decides: the fast path's asyncio
protocol (head parsing and rendering), the bridge to aiohttp's server for everything else, the
registry client, and the limits every connection of a listener shares. Nothing here imports
policy or identity: decisions come from the application (gateway.app.Gateway, gateway.admission)
through the calls the transports make. aiohttp's internals are used in one file only
(aiohttp_internals.py), which says which aiohttp versions it is written against."""
