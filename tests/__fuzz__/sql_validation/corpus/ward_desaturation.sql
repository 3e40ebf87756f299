-- Ward-level: three or more patients of one ward with SpO2 under 90 % in the same minute
-- (an oxygen supply fault, or a staffing emergency). One row, so one alert, per patient
-- involved. The ward comes from the engine's `[engine.wards]` config.
-- Window: 60 s tumbling (pipelines/analyst.toml).
WITH low AS (
    SELECT ward, patient_id, device_id, min(spo2) AS lowest
    FROM vitals
    WHERE ward IS NOT NULL AND patient_id IS NOT NULL
    GROUP BY ward, patient_id, device_id
    HAVING min(spo2) < 90
)
SELECT patient_id, device_id, lowest AS value,
       CAST(patients AS VARCHAR) || ' patients in ward ' || ward
           || ' below 90 % SpO2 in the same minute' AS message
FROM (SELECT *, count(DISTINCT patient_id) OVER (PARTITION BY ward) AS patients FROM low) AS w
WHERE patients >= 3
