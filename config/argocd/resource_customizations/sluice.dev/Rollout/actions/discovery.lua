-- Which of the Rollout's actions apply now. The operator ignores a request with nothing to act
-- on, so these only keep the menu honest.
local status = obj.status or {}
local in_flight = status.canaryRevision ~= nil and status.abortedAt == nil

-- A pause request is in force while it is newer than the last resume (as the operator reads
-- it); both times are RFC 3339 UTC with whole seconds, so they compare as text.
local paused_by_request = status.pause ~= nil
  and (status.resume == nil or status.pause.requestedAt > status.resume.requestedAt)

local actions = {}
actions["promote"] = { ["disabled"] = not in_flight, ["displayName"] = "Promote" }
actions["promote-full"] = { ["disabled"] = not in_flight, ["displayName"] = "Promote full" }
actions["abort"] = { ["disabled"] = not in_flight, ["displayName"] = "Abort" }
actions["retry"] = {
  ["disabled"] = status.abortedAt == nil and status.budgetRollback == nil,
  ["displayName"] = "Retry",
}
actions["pause"] = { ["disabled"] = paused_by_request, ["displayName"] = "Pause" }
actions["resume"] = { ["disabled"] = not paused_by_request, ["displayName"] = "Resume" }
return actions
