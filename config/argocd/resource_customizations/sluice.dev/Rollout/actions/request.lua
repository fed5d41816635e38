-- Shared by every Rollout action (prepended to each action's script in argocd-cm).
--
-- An action writes the same request into the Rollout's status as `kubectl sluice` does: an
-- intent with a unique id, the time, who asked and why. ArgoCD patches the status subresource
-- for it, so the spec that git owns is never touched. ArgoCD does not tell the script who
-- clicked, so the request names ArgoCD itself.
local os = require("os")

-- Seconds since 1970 to an RFC 3339 UTC time. ArgoCD's os.date formats in the server's
-- local zone and ignores `!`, and a custom action runs without the string library, so the
-- conversion is done by hand (Hinnant's civil_from_days; Lua 5.1 has no integer division).
local function div(a, b)
  return (a - a % b) / b
end

local function two(n)
  if n < 10 then
    return "0" .. n
  end
  return "" .. n
end

local function utc(seconds)
  local days = div(seconds, 86400)
  local rest = seconds % 86400
  local z = days + 719468
  local era = div(z, 146097)
  local doe = z - era * 146097
  local yoe = div(doe - div(doe, 1460) + div(doe, 36524) - div(doe, 146096), 365)
  local doy = doe - (365 * yoe + div(yoe, 4) - div(yoe, 100))
  local mp = div(5 * doy + 2, 153)
  local day = doy - div(153 * mp + 2, 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return year .. "-" .. two(month) .. "-" .. two(day) .. "T" .. two(div(rest, 3600)) .. ":"
    .. two(div(rest % 3600, 60)) .. ":" .. two(rest % 60) .. "Z"
end

local function request(field)
  if obj.status == nil then
    obj.status = {}
  end
  local now = utc(os.time())
  obj.status[field] = {
    id = now .. "/argocd/" .. (obj.metadata.resourceVersion or "0"),
    requestedAt = now,
    requestedBy = "argocd",
    reason = "requested through an ArgoCD resource action",
  }
  return obj
end
