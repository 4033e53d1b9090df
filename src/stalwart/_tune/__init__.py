"""``python -m stalwart tune``: choose thresholds from a simulation in virtual time.

The modules, in the order data flows through them:

* `schema`: every key of a scenario file, its type, default and meaning;
* `scenario`: reads and validates a scenario, expands its grid into settings;
* `builtin`: the scenarios shipped with stalwart (``scenarios/*.toml``);
* `engine`: runs one setting's real policies against the simulated downstream,
  on a virtual clock;
* `runner`: runs every setting, on several processes, with a progress bar;
* `report`: turns the runs into the numbers per setting, a ranking, a table
  and JSON;
* `plot`: draws the best and the worst setting over time (matplotlib);
* `command`: the command line.
"""
