"""The process model: one relay node (the composition root), `relay serve`, the supervisor
and its workers, the supervisor's fan-out admin API, logging setup and systemd notify."""
