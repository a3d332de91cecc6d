"""`pascaline bench`: synthetic real-width models, timers, reports and projections."""
