-- Argo CD health of a keyroom.dev SigningKey (see docs/gitops.md).
-- Healthy: a version can sign (online or offline until its next window), or a OneTime key that signed its
-- request (Consumed) or whose versions were all destroyed (Destroyed): both are final.
-- Degraded: Stalled (a configuration only an admin can fix). Progressing: anything else.
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
  if status.phase == "Offline" and status.nextWindowAt ~= nil then
    hs.message = hs.message .. " (offline until " .. status.nextWindowAt .. ")"
  end
  return hs
end
hs.message = say(ready)
return hs
