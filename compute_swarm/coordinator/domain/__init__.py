"""The coordinator's decisions as pure functions and plain data: a job's lifecycle (one transition
function), prices, the scheduler's plan, verification's policy and comparisons, and the effects a
change asks for. Nothing here touches the database, the network or the clock."""
