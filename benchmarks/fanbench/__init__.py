"""The fan-out benchmark behind ``benchmarks/fanout.py`` (see ``benchmarks/README.md``).

Modules: ``common`` (constants, process and machine helpers), ``apps`` (the server variants),
``serve`` (the server process), ``procs`` (server and redis-server processes, seen from the
load side), ``clients`` (the load process's WebSocket clients), ``runs`` (one run of each
mode), ``report`` (Markdown and saved results), ``chart`` (the PNG) and ``cli`` (options and
the interleaving of runs); ``scale`` and ``scale_report`` are ``benchmarks/scale.py``'s (the
burst at several N, and its Markdown, JSON and chart); ``soak`` (its clients: drops, resumes,
stalls), ``soak_run`` and ``soak_report`` are the soak mode's.
"""
