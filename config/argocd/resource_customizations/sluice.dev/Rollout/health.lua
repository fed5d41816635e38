-- ArgoCD health of a Sluice Rollout (sluice.dev/v1alpha1).
--
-- Order follows ArgoCD's conventions: first whether Sluice has seen the current spec at all,
-- then what its status says. A release that waits with no end set (for a person, or an
-- ErrorBudget freeze) is Suspended. ArgoCD treats Suspended like Progressing within a sync,
-- so resources in later sync waves wait for it; the annotation
-- `sluice.dev/argocd-paused-health: Healthy` reports such a wait as Healthy instead.
--
-- A new revision held by a Pipeline (pause reason PipelineGate) has not started: the stable
-- revision serves as before, so the Rollout is Healthy. It must be, since a Pipeline's
-- `argoCD` gate waits for this very Application to be Healthy before it admits the release.
local hs = {}

local function held_by_pipeline_only(status)
  if status.pauseConditions == nil or status.pauseConditions[1] == nil then
    return false
  end
  for _, condition in ipairs(status.pauseConditions) do
    if condition.reason ~= "PipelineGate" then
      return false
    end
  end
  return true
end

local function waits_indefinitely(status, spec)
  if status.pauseConditions == nil then
    return false
  end
  for _, condition in ipairs(status.pauseConditions) do
    if condition.reason ~= "CanaryPauseStep" then
      return true
    end
    -- A pause step with a duration ends by itself; one without waits for `promote`.
    local index = status.currentStepIndex
    local steps = spec.strategy ~= nil and spec.strategy.canary ~= nil and spec.strategy.canary.steps or nil
    if index == nil or steps == nil or steps[index + 1] == nil then
      return true
    end
    local pause = steps[index + 1].pause
    if pause == nil or pause.duration == nil then
      return true
    end
  end
  return false
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to observe the Rollout"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for Sluice to observe generation " .. obj.metadata.generation
  return hs
end

local message = status.message or ""
if status.phase == "Degraded" or status.abortedAt ~= nil then
  hs.status = "Degraded"
  hs.message = message
  return hs
end
if status.phase == "Paused" then
  if held_by_pipeline_only(status) then
    hs.status = "Healthy"
  elseif waits_indefinitely(status, obj.spec) then
    local annotations = obj.metadata.annotations
    if annotations ~= nil and annotations["sluice.dev/argocd-paused-health"] == "Healthy" then
      hs.status = "Healthy"
    else
      hs.status = "Suspended"
    end
  else
    hs.status = "Progressing"
  end
  hs.message = message
  return hs
end
if status.phase == "Healthy" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end
if status.phase == "Progressing" then
  hs.status = "Progressing"
  hs.message = message
  return hs
end
hs.status = "Progressing"
hs.message = "Waiting for Sluice to report a phase"
return hs
