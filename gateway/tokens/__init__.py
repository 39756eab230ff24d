"""Registry tokens (the distribution token specification): scopes asked for, grants decided by
the same policy as every request, JWTs signed and checked by the gateway, and the token endpoint.

`scopes` and `grants` are pure decisions; `keys` reads and writes signing keys; `jwt_tokens`
signs and verifies; `endpoint` is the HTTP side.
"""
