"""The web page (`ui: true`, under /ui/): browse what you may pull, see why you may not push.

Server-rendered (Jinja2, autoescaping every value: repository names, tags, labels and annotations
are chosen by whoever pushes), with one small static script for the copy buttons; a strict
Content-Security-Policy allows nothing else. `sessions` and `views` are pure; `pages` does the
HTTP and the registry reads.
"""
