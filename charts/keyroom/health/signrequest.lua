-- Argo CD health of a keyroom.dev SignRequest (see docs/gitops.md).
-- Healthy: Signed. Degraded: Denied, Expired or Failed (final, Stalled). Progressing: waiting for approvals,
-- builds, a signing window or the signer; the message says what it waits for.
local hs = {status = "Progressing", message = "waiting for the keyroom operator to report on it"}
local status = obj.status
if status == nil or status.conditions == nil then
  return hs
end
if status.observedGeneration == nil or status.observedGeneration ~= obj.metadata.generation then
  hs.message = "the keyroom operator has not yet reported on generation " .. tostring(obj.metadata.generation)
  return hs
end
local found = {}
for _, condition in ipairs(status.conditions) do
  found[condition.type] = condition
end
local function say(condition)
  local text = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(found.Stalled)
  return hs
end
if found.Reconciling ~= nil and found.Reconciling.status == "True" then
  hs.message = say(found.Reconciling)
  return hs
end
local ready = found.Ready
if ready == nil then
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(ready)
  return hs
end
hs.message = say(ready)
if ready.reason == "AwaitingApproval" then
  hs.message = hs.message .. " (kubectl keyroom approve " .. obj.metadata.name .. " -n " .. obj.metadata.namespace .. ")"
end
return hs
