-- ArgoCD health of a Sluice ErrorBudget (sluice.dev/v1alpha1).
--
-- Health says whether the budget can be evaluated, not how much of it is left: a budget 80%
-- consumed is doing its job (freezing releases), and reporting it Degraded would turn every
-- Application that holds a budget Degraded. The level is in the message.
local hs = {}
local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to evaluate the budget"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to evaluate generation " .. obj.metadata.generation
  return hs
end

local message = status.message or ""
if status.phase == "Unknown" then
  -- Prometheus unreachable, or a query it rejects: the policy cannot see the budget.
  hs.status = "Degraded"
  hs.message = message
  return hs
end
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    -- Ready is False for InsufficientData too, which is not a failure.
    if condition.type == "Ready" and condition.status == "False"
      and condition.reason ~= "InsufficientData" then
      hs.status = "Degraded"
      hs.message = condition.message or message
      return hs
    end
  end
end
if status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to evaluate the budget"
  return hs
end
-- Healthy, Warning, Frozen, Exhausted: evaluation works. InsufficientData: it works too, the
-- service has had no events in the window yet (a quiet or new service must not hold a sync).
hs.status = "Healthy"
if message == "" then
  hs.message = status.phase
else
  hs.message = status.phase .. ": " .. message
end
return hs
