"""Automatic HTTPS: certificates from an ACME CA (RFC 8555), obtained at start and renewed by the
gateway itself (`acme_directory`). `storage` keeps the account key, the certificate and the
answers to pending challenges in one directory, shared by every worker and by gateways that
share it; `challenges` answers HTTP-01 (on the redirect listener) and TLS-ALPN-01 (on the TLS
listener) from it; `ordering` talks to the CA (certbot's `acme` library); `manager` decides when
to order and keeps serving the current certificate while the CA fails. docs/acme.md."""
