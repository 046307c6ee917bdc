"""The application on top of the library, apart from it (as open_clip keeps ``open_clip_train``): the
runner that turns a run config into ``runs/<name>/<label>/`` (``runner.py``), the comparison of runs
(``compare.py``), plots (``plots.py``) and the speed benchmark (``speed.py``). The command line
(``continual_lora/cli.py``) is its only caller besides tests; importing the library never imports it."""
