-- Orthanc auto-routing of chest radiographs to cxr-triage.
--
-- When a study has been quiet for "StableAge" seconds, every instance of a series whose
-- Modality is CR or DX and whose BodyPartExamined is CHEST (or THORAX) that has not been
-- sent yet is sent to the modality named CXR_TRIAGE in "DicomModalities", and marked
-- with the user metadata "CxrTriageRouted" (declared in orthanc.json's "UserMetadata").
--
-- cxr-triage's results (an SR and an SC heatmap) make the study unstable, then stable
-- again: the mark keeps the originals from being sent a second time, and the results
-- themselves are never routed (neither CR nor DX).  A late image of the same study is
-- the only thing sent then.  The same rule can live in a commercial PACS as an
-- auto-routing rule (see deploy/PACS.md).

local TARGET = "CXR_TRIAGE"
local MODALITIES = { CR = true, DX = true }
local BODY_PARTS = { CHEST = true, THORAX = true }

local function upper(value)
  if value == nil then return "" end
  return string.upper(value)
end

function IsChestRadiograph(series)
  local tags = series["MainDicomTags"] or {}
  if not MODALITIES[upper(tags["Modality"])] then
    return false
  end
  local part = upper(tags["BodyPartExamined"])
  if part == "" then
    -- Some modalities put the body part only in the instances: look at the first one.
    local instances = ParseJson(RestApiGet("/series/" .. series["ID"] .. "/instances"))
    if #instances > 0 then
      local simplified = ParseJson(RestApiGet("/instances/" .. instances[1]["ID"] .. "/simplified-tags"))
      part = upper(simplified["BodyPartExamined"])
    end
  end
  return BODY_PARTS[part] == true
end

local ROUTED = "CxrTriageRouted"

local function AlreadyRouted(instanceId)
  local ok, value = pcall(RestApiGet, "/instances/" .. instanceId .. "/metadata/" .. ROUTED)
  return ok and value ~= nil and value ~= ""
end

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet("/studies/" .. studyId .. "/series"))
  local selected = {}
  for _, s in ipairs(series) do
    if IsChestRadiograph(s) then
      for _, instanceId in ipairs(s["Instances"]) do
        if not AlreadyRouted(instanceId) then
          table.insert(selected, instanceId)
        end
      end
    end
  end
  if #selected == 0 then
    return
  end
  PrintRecursive("cxr-triage: routing " .. #selected .. " new chest instance(s) of study " .. studyId)
  local job = { Resources = selected, Synchronous = true }
  RestApiPost("/modalities/" .. TARGET .. "/store", DumpJson(job, true))
  -- Marked once sent (a failed send raises and leaves them unmarked for the next time).
  for _, instanceId in ipairs(selected) do
    RestApiPut("/instances/" .. instanceId .. "/metadata/" .. ROUTED, "1")
  end
end
