"""``alignlab bench``: suites of tasks × algorithms × sweeps × seeds run as parallel, resumable
processes, every cell evaluated against the reference policy, and the leaderboard, plots and
HTML report of a run (issue 13)."""
