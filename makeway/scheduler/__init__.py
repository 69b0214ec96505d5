"""Pure scheduling decisions: functions of state and time, with no I/O.

The node carries these decisions out; keeping them here lets tests drive
them with a fake clock and exact times.
"""
