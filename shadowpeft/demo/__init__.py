"""The main job and the demos: the one room of ``shadowpeft`` that uses all three packages.

* ``mainjob``: train, export, and run the runtime modes on the embedded default (``shadowpeft demo``).
* ``report``: the main job's summary; ``server``: the ``shadow-serve`` process it starts and stops.
* ``decode_demo``: the short attached/detached decoding demo (``shadowpeft decode-demo``).
"""
