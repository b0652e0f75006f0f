# Used by `make book` through IPYTHONDIR: silences the kernel's "running over TCP without encryption"
# warning, which a strict (-W) build would otherwise turn into an error.
c.IPKernelApp.log_level = "ERROR"  # noqa: F821 (``c`` is provided by IPython's config loader)
