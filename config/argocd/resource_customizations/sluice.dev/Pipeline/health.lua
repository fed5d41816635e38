-- ArgoCD health of a Sluice Pipeline (sluice.dev/v1alpha1), from its stages.
--
-- Degraded: the spec names something that does not work (Ready is False), or a stage's release
-- failed. Suspended: a stage waits with no end set, for an approval or an ErrorBudget freeze.
-- Progressing: a stage releases, soaks or waits for a gate that clears by itself. Healthy:
-- every stage runs the release it admitted.
local hs = {}
local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to observe the Pipeline"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to observe generation " .. obj.metadata.generation
  return hs
end
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" and condition.status == "False" then
      hs.status = "Degraded"
      hs.message = condition.message or status.message or ""
      return hs
    end
  end
end

-- The worst stage decides; the first stage of that kind gives the message.
local rank = { Healthy = 0, Pending = 0, Progressing = 1, Soaking = 1, WaitingForGates = 1,
  WaitingForApproval = 2, Frozen = 2, Failed = 3 }
local health = { [0] = "Healthy", [1] = "Progressing", [2] = "Suspended", [3] = "Degraded" }
local worst = 0
local message = status.message or ""
for _, stage in ipairs(status.stages or {}) do
  local r = rank[stage.phase] or 1
  if r > worst then
    worst = r
    message = stage.name .. ": " .. (stage.message or stage.phase)
  end
end
hs.status = health[worst]
hs.message = message
return hs
